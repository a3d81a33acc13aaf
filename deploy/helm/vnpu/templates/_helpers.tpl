{{- define "vnpu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The start of every object's name: the release name, with "-<name>" added unless it contains it
(fullnameOverride: instead of both). At most 63 characters, a DNS-1123 subdomain as the names of
Deployments, ServiceAccounts, Roles and admission policies must be: a release name (Helm: at most 53,
dots allowed) never needs shortening, so the names an installed release has stay as they are
(immutable selectors, the Lease and the bindings depend on it). Service names need more
(vnpu.serviceName). Not a valid name only if the schema was skipped: said, not left to the API server. */}}
{{- define "vnpu.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "vnpu.name" .) .Release.Name -}}
{{- $name = .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name (include "vnpu.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $name) -}}
{{- fail (printf "the chart's object names would start with %q, which is not a Kubernetes name (lowercase letters, digits, '-' and '.', first and last a letter or a digit): set fullnameOverride to a DNS label (e.g. \"vnpu\"), and nameOverride, if set, to one too" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* A Service's name, "<fullname>-<suffix>" (dict "root" . "suffix" "gateway"): the API server wants a
DNS-1035 label, at most 63 characters of lowercase letters, digits and '-' starting with a letter,
where the other objects take a longer name, dots or a digit first. Where "<fullname>-<suffix>" is one
already (every release that installed before: "vnpu-gateway" for the release "vnpu") it is the name.
Else its dots become '-', it gets "vnpu-" in front when it starts with a digit ("2024-prod"), and when
still too long (a release name of 42 characters or more, "-vnpu" added) it is cut, keeping the suffix
and 5 characters of a hash of the whole name: two releases alike up to the cut still get two names. */}}
{{- define "vnpu.serviceName" -}}
{{- $full := printf "%s-%s" (include "vnpu.fullname" .root) .suffix -}}
{{- $name := $full | replace "." "-" -}}
{{- if not (regexMatch "^[a-z]" $name) -}}
{{- $name = printf "vnpu-%s" $name -}}
{{- end -}}
{{- if gt (len $name) 63 -}}
{{- $keep := sub 63 (add (len .suffix) 7) | int -}}
{{- $name = printf "%s-%s-%s" ($name | trunc $keep | trimSuffix "-") (sha256sum $full | trunc 5) .suffix -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "vnpu.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vnpu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: vnpu
{{- end -}}

{{- define "vnpu.selector" -}}
app.kubernetes.io/name: {{ include "vnpu.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vnpu.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "vnpu.operatorServiceAccount" -}}
{{- printf "%s-operator" (include "vnpu.fullname" .) -}}
{{- end -}}

{{- define "vnpu.devicePluginServiceAccount" -}}
{{- printf "%s-device-plugin" (include "vnpu.fullname" .) -}}
{{- end -}}

{{- define "vnpu.gatewayServiceAccount" -}}
{{- printf "%s-gateway" (include "vnpu.fullname" .) -}}
{{- end -}}

{{/* The operator's leader-election Lease, in the release namespace: the Deployment's
--leader-election-id and the only Lease its Role may read and update. */}}
{{- define "vnpu.operatorLease" -}}
{{- printf "%s-operator" (include "vnpu.fullname" .) -}}
{{- end -}}

{{/* The placeholder pods' PriorityClass: one per cluster, the name the operator uses (vnpu.operator.config). */}}
{{- define "vnpu.placeholderPriorityClass" -}}
vnpu-placeholder
{{- end -}}

{{/* Restricted-profile container security context (PodSecurity "restricted"). */}}
{{- define "vnpu.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* The chart's pods pull with imagePullSecrets (the operator gives the model pods the same names). */}}
{{- define "vnpu.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ .name }}
{{- end }}
{{- end }}
{{- end -}}
