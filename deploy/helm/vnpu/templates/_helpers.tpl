{{- define "vnpu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vnpu.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "vnpu.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "vnpu.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
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
