{{/* Name of the chart, or nameOverride. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; object names append a component suffix to it. */}}
{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shoal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "shoal.labels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: {{ include "shoal.selectorLabels" (list . "router") }} */}}
{{- define "shoal.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "shoal.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of one component's objects and pods. shoal.dev/component marks Shoal's own pods
     (the local test cluster's pod runner runs them from it); engines carry "engine". */}}
{{- define "shoal.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "shoal.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
shoal.dev/component: {{ index . 1 }}
{{- end }}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "shoal.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "shoal.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shoal.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (printf "%s-router" (include "shoal.fullname" .)) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shoal.peeringName" -}}
{{- default (include "shoal.fullname" .) .Values.operator.peeringName }}
{{- end }}

{{/* Namespaces the operator reconciles when it is not cluster-wide (deduplicated). */}}
{{- define "shoal.operator.namespaces" -}}
{{- $ns := .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $ns) }}
{{- end }}

{{- define "shoal.router.discoveryNamespace" -}}
{{- default .Release.Namespace .Values.router.discovery.namespace }}
{{- end }}

{{- define "shoal.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis.%s.svc:%d/0" (include "shoal.fullname" .) .Release.Namespace (int .Values.redis.port) }}
{{- else }}
{{- .Values.router.redisUrl }}
{{- end }}
{{- end }}

{{/* Downward-API env every Shoal pod gets: who and where it is. */}}
{{- define "shoal.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* Preferred anti-affinity that spreads one component's replicas over nodes. */}}
{{- define "shoal.spreadAffinity" -}}
{{- $root := index . 0 -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "shoal.selectorLabels" . | nindent 12 }}
{{- end }}

{{/*
The LoRA adapter cache claim: lora.cache.claimName, or <fullname>-lora-cache when the chart
creates it; empty when neither.
*/}}
{{- define "shoal.loraCacheClaim" -}}
{{- $cache := .Values.operator.lora.cache -}}
{{- if $cache.claimName -}}
{{- $cache.claimName -}}
{{- else if $cache.create -}}
{{- printf "%s-lora-cache" (include "shoal.fullname" .) -}}
{{- end -}}
{{- end }}
