{{/* The base name of every object: `detour` unless fullnameOverride is set. */}}
{{- define "detour.fullname" -}}
{{- default "detour" .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "detour.webhookService" -}}{{ include "detour.fullname" . }}-webhook{{- end -}}
{{- define "detour.webhookSecret" -}}{{ include "detour.fullname" . }}-webhook-tls{{- end -}}
{{- define "detour.webhookConfig" -}}{{ include "detour.fullname" . }}-injector{{- end -}}
{{- define "detour.leaseName" -}}{{ include "detour.fullname" . }}-operator{{- end -}}

{{- define "detour.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "detour.selectorLabels" -}}
app.kubernetes.io/name: detour
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "detour.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: detour
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
What the operator reads and writes: the ONE list (docs/operator.md "Permissions" describes it;
tests/chart_rbac.rs checks it against the API calls the operator makes: every call granted, every
grant used). `cluster` becomes the ClusterRole, `namespace` the Role in the release namespace.
Policies and pods are read through list/watch only: the operator never GETs one.
*/}}
{{- define "detour.permissions" -}}
cluster:
  - apiGroups: [detour.dev]
    resources: [upstreampolicies]
    verbs: [list, watch, patch]
  - apiGroups: [detour.dev]
    resources: [upstreampolicies/status]
    verbs: [patch]
  - apiGroups: [""]
    resources: [services]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
  # only detour-config, labelled app.kubernetes.io/managed-by=detour-operator; get and watch
  # because the sidecars' Role grants them and Kubernetes lets the operator grant only what it holds
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [get, list, watch, patch, delete]
  - apiGroups: [rbac.authorization.k8s.io]
    resources: [roles, rolebindings]
    resourceNames: [detour-sidecar]
    verbs: [get, patch, delete]
  # patch: a repeated event becomes a series (kube's Recorder)
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create, patch]
  # only pods labelled detour.dev/sidecar are listed
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, watch]
  {{- if not .Values.webhook.certManager.enabled }}
  # the leader keeps the caBundle current (cert-manager's CA injector does it otherwise)
  - apiGroups: [admissionregistration.k8s.io]
    resources: [mutatingwebhookconfigurations]
    resourceNames: [{{ include "detour.webhookConfig" . }}]
    verbs: [get, patch]
  {{- end }}
namespace:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [get, create, patch]
  # the webhook's certificate: list/watch with a metadata.name field selector, so resourceNames
  # holds for them too; only read when cert-manager writes it
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [{{ include "detour.webhookSecret" . }}]
    verbs: [get, list, watch{{ if not .Values.webhook.certManager.enabled }}, patch{{ end }}]
{{- end -}}
