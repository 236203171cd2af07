{{/* Names, labels, images and security contexts shared by every template. */}}

{{- define "flashmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name: the release name, plus the chart's name unless the
release name already holds it (release "flashmesh" -> "flashmesh"). */}}
{{- define "flashmesh.fullname" -}}
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

{{- define "flashmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A component's object name: (dict "ctx" $ "component" "agent") -> flashmesh-agent. */}}
{{- define "flashmesh.componentName" -}}
{{- printf "%s-%s" (include "flashmesh.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flashmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flashmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flashmesh.labels" -}}
helm.sh/chart: {{ include "flashmesh.chart" . }}
{{ include "flashmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flashmesh
{{- end }}

{{/* (dict "ctx" $ "component" "agent") */}}
{{- define "flashmesh.componentSelectorLabels" -}}
{{ include "flashmesh.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flashmesh.componentLabels" -}}
{{ include "flashmesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Pod template metadata: component labels, and the user's extra labels and annotations. */}}
{{- define "flashmesh.podMetadata" -}}
labels:
  {{- include "flashmesh.componentLabels" . | nindent 2 }}
  {{- with .ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .ctx.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "flashmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A sidecar's image: (dict "ctx" $ "sidecar" "provisioner") */}}
{{- define "flashmesh.sidecarImage" -}}
{{- $s := index .ctx.Values.sidecars .sidecar }}
{{- printf "%s/%s:%s" .ctx.Values.sidecars.registry $s.image $s.tag }}
{{- end }}

{{/* What every pod spec starts with: its service account, pull secrets and scheduling.
(dict "ctx" $ "values" .Values.agent "serviceAccount" "flashmesh-agent") */}}
{{- define "flashmesh.podSpecCommon" -}}
serviceAccountName: {{ .serviceAccount }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The unprivileged components (operator, CSI controller) run as the image's non-root
user (10001, see the Dockerfile) under the restricted Pod Security Standard. */}}
{{- define "flashmesh.restrictedPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "flashmesh.restrictedSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The agent and the node plugin: root and privileged (configfs, LVM, device-mapper, md,
nvme connect, mounts that propagate to the host). */}}
{{- define "flashmesh.privilegedSecurityContext" -}}
privileged: true
runAsUser: 0
runAsNonRoot: false
allowPrivilegeEscalation: true
{{- end }}

{{/* Sidecars beside a privileged container: root (the sockets and the kubelet's
registration folder belong to root) but nothing else. */}}
{{- define "flashmesh.rootSidecarSecurityContext" -}}
runAsUser: 0
runAsNonRoot: false
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* Environment every flashmesh container gets: (dict "ctx" $ "port" 9810) */}}
{{- define "flashmesh.commonEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: FLASHMESH_METRICS_PORT
  value: {{ .port | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* A Deployment's PodDisruptionBudget: (dict "ctx" $ "component" "operator").
maxUnavailable 1, never minAvailable: it follows the replicas as they change and never
blocks a drain of a one-replica Deployment (minAvailable 1 there would, for good), while a
larger one loses at most one pod at a time to evictions. An unhealthy pod (crash-looping,
not ready) may always be evicted: keeping it protects nothing. */}}
{{- define "flashmesh.podDisruptionBudget" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "flashmesh.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "flashmesh.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "flashmesh.componentSelectorLabels" . | nindent 6 }}
{{- end }}
