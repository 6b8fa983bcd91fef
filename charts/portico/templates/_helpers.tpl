{{/* Names, at most 63 characters as Kubernetes requires. */}}
{{- define "portico.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portico.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "portico.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "portico.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "portico.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portico.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "portico.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portico.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "portico.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "portico.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ProviderConfig's spec for the chosen cloud; refuses settings the cloud cannot work without. */}}
{{- define "portico.providerSettings" -}}
{{- $p := .Values.providerConfig }}
{{- if eq $p.provider "local" }}
local:
  apiAddress: {{ required "providerConfig.local.apiAddress is required for the local provider (host:port of the local cloud's API)" $p.local.apiAddress | quote }}
  {{- with $p.local.addressPool }}
  addressPool: {{ . | quote }}
  {{- end }}
{{- else if eq $p.provider "aws" }}
aws:
  region: {{ required "providerConfig.aws.region is required for the aws provider" $p.aws.region | quote }}
  {{- if not $p.aws.subnets }}
  {{- fail "providerConfig.aws.subnets needs at least one subnet for the aws provider" }}
  {{- end }}
  subnets: {{ toJson $p.aws.subnets }}
  securityGroups: {{ toJson $p.aws.securityGroups }}
  scheme: {{ $p.aws.scheme | quote }}
  {{- with $p.aws.vpcId }}
  vpcId: {{ . | quote }}
  {{- end }}
  tags: {{ toJson $p.aws.tags }}
  {{- with $p.aws.endpointUrl }}
  endpointUrl: {{ . | quote }}
  {{- end }}
{{- else if eq $p.provider "gcp" }}
gcp:
  project: {{ required "providerConfig.gcp.project is required for the gcp provider" $p.gcp.project | quote }}
  region: {{ required "providerConfig.gcp.region is required for the gcp provider" $p.gcp.region | quote }}
  network: {{ $p.gcp.network | quote }}
  networkTier: {{ $p.gcp.networkTier | quote }}
  {{- with $p.gcp.nodeTags }}
  nodeTags: {{ toJson . }}
  {{- end }}
  {{- with $p.gcp.endpointUrl }}
  endpointUrl: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}
