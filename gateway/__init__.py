"""The vnpu gateway: one OpenAI-compatible endpoint for every model of the cluster.

Module map: ``routing`` (pure: model names, routes, picking a replica), ``discovery`` (watches
InferenceModels and EndpointSlices), ``keys`` (optional API keys per model), ``activity`` (request
counts for the operator; waking a model scaled to zero), ``server`` (the aiohttp front door),
``main`` (``vnpu gateway``).
"""
