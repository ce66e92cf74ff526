{{- define "chatflow-operator.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resources' name: the release name alone when it already holds the chart's. */}}
{{- define "chatflow-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "chatflow-operator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatflow-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatflow-operator.labels" -}}
helm.sh/chart: {{ include "chatflow-operator.chart" . }}
{{ include "chatflow-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatflow
{{- end }}

{{- define "chatflow-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatflow-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chatflow-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "chatflow-operator.fullname" .) }}
{{- else }}
{{- required "serviceAccount.name: the existing ServiceAccount to run as" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatflow-operator.peeringName" -}}
{{- .Values.peering.name | default (include "chatflow-operator.fullname" .) }}
{{- end }}

{{/* The namespaces watched with rbac.scope=namespace, as a JSON list (for fromJsonArray). */}}
{{- define "chatflow-operator.watchNamespaces" -}}
{{- if and .Values.watchNamespaces (eq .Values.rbac.scope "cluster") }}
{{- fail "watchNamespaces needs rbac.scope=namespace; rbac.scope=cluster watches every namespace" }}
{{- end }}
{{- .Values.watchNamespaces | default (list .Release.Namespace) | toJson }}
{{- end }}
