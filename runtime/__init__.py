"""vnpu's model runtime: a weights-holder shares one copy of a model per device, replicas serve it.

See runtime/README.md for the modules, the environment contract and the protocol. Importing this
package imports nothing heavy; torch loads only with the modules that compute.
"""
