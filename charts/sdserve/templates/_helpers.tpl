{{/* Chart name. */}}
{{- define "sdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, shortened to leave room for KubeRay's suffixes. */}}
{{- define "sdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{- define "sdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sdserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Custom Ray resource a worker group advertises and its stage asks for. */}}
{{- define "sdserve.groupResource" -}}
{{- printf "sdserve_%s" . }}
{{- end }}

{{/*
The stages this release deploys, in table order, as YAML `stages: [...]` (rows of files/stages.yaml, which
`sdserve render-stage-table` writes from serving/stages.py): every stage, an optional one only when its
catalog section `config.<catalog>` names something (Stage.deployed). Nothing here names a stage: a new row
in the table needs no template change.
*/}}
{{- define "sdserve.deployedStages" -}}
{{- $table := .Files.Get "files/stages.yaml" | fromYaml }}
{{- $stages := list }}
{{- range $table.stages }}
{{- if or (not .optional) (get ($.Values.config | default dict) .catalog) }}
{{- $stages = append $stages . }}
{{- end }}
{{- end }}
{{- toYaml (dict "stages" $stages) }}
{{- end }}

{{/*
The worker groups hosting the deployed stages, in table order, as YAML `groups: [{name, settings}]` (a group
hosting several stages appears once; disabled groups included, callers check `settings.enabled`). A group's
settings are `workerGroups.<group>` laid over `workerGroupDefaults`, so a stage whose group has no entry in
values still gets a group. A `workerGroups` entry no stage of the table runs on is an error (a typo, or an
extra group that belongs in `additionalWorkerGroups`).
*/}}
{{- define "sdserve.stageGroups" -}}
{{- $table := .Files.Get "files/stages.yaml" | fromYaml }}
{{- $known := list }}
{{- range $table.stages }}
{{- $known = append $known .workerGroup }}
{{- end }}
{{- range $name, $_ := .Values.workerGroups }}
{{- if not (has $name $known) }}
{{- fail (printf "workerGroups.%s: no stage runs on a group of that name (stage groups: %s); extra groups go in additionalWorkerGroups" $name (join ", " (uniq $known))) }}
{{- end }}
{{- end }}
{{- $groups := list }}
{{- $seen := dict }}
{{- range (include "sdserve.deployedStages" . | fromYaml).stages }}
{{- if not (hasKey $seen .workerGroup) }}
{{- $_ := set $seen .workerGroup true }}
{{- $own := get ($.Values.workerGroups | default dict) .workerGroup | default dict }}
{{- $settings := mustMergeOverwrite (deepCopy $.Values.workerGroupDefaults) (deepCopy $own) }}
{{- $groups = append $groups (dict "name" .workerGroup "settings" $settings) }}
{{- end }}
{{- end }}
{{- toYaml (dict "groups" $groups) }}
{{- end }}

{{/*
The extra worker groups of `additionalWorkerGroups` that are not `disabled`, by name, as YAML
`groups: [{name, settings}]`, each laid over `workerGroupDefaults`. They advertise no sdserve stage resource.
*/}}
{{- define "sdserve.additionalGroups" -}}
{{- $stageGroups := list }}
{{- range (.Files.Get "files/stages.yaml" | fromYaml).stages }}
{{- $stageGroups = append $stageGroups .workerGroup }}
{{- end }}
{{- $groups := list }}
{{- range $name, $group := .Values.additionalWorkerGroups | default dict }}
{{- if has $name $stageGroups }}
{{- fail (printf "additionalWorkerGroups.%s: a stage's worker group has that name; configure it in workerGroups.%s" $name $name) }}
{{- end }}
{{- if not (get $group "disabled") }}
{{- $settings := mustMergeOverwrite (deepCopy $.Values.workerGroupDefaults) (omit (deepCopy $group) "disabled") }}
{{- $groups = append $groups (dict "name" $name "settings" $settings "resource" "") }}
{{- end }}
{{- end }}
{{- toYaml (dict "groups" $groups) }}
{{- end }}

{{/*
The sdserve AppConfig the chart deploys: the user's `config`, plus each stage pinned to its worker group
(and the ingress to the head) through custom Ray resources, the HTTP proxy on 0.0.0.0:8000, and API keys read
from the mounted Secret (`auth`).
*/}}
{{- define "sdserve.appConfig" -}}
{{- $pins := dict
  "http" (dict "host" "0.0.0.0" "port" (int .Values.service.httpPort))
  "grpc" (dict "enabled" .Values.grpc.enabled "port" (int .Values.service.grpcPort))
  "ingress" (dict "resources" (dict "resources" (dict "sdserve_head" 1)))
  "outputs" (dict "directory" "/tmp/sdserve/outputs")
}}
{{- /* The deployed stages, listed (as render-serve-config does): the catalog is not in args, so build_app
     learns which optional stages to bind from this list. A deployed stage whose group is disabled is not
     pinned: it runs wherever its resources fit. */}}
{{- $names := list }}
{{- range (include "sdserve.deployedStages" . | fromYaml).stages }}
{{- $names = append $names .name }}
{{- end }}
{{- $_ := set $pins "stages" $names }}
{{- $groups := dict }}
{{- range (include "sdserve.stageGroups" . | fromYaml).groups }}
{{- $_ := set $groups .name .settings }}
{{- end }}
{{- range (include "sdserve.deployedStages" . | fromYaml).stages }}
{{- if (get $groups .workerGroup).enabled }}
{{- $resource := include "sdserve.groupResource" .workerGroup }}
{{- $_ := set $pins .name (dict "resources" (dict "resources" (dict $resource 1))) }}
{{- end }}
{{- end }}
{{- if include "sdserve.stylesConfigMap" . }}
{{- $_ := set $pins "styles" (dict "directory" "/etc/sdserve/styles") }}
{{- end }}
{{- /* API keys from the Secret mounted in every pod (sdserve.volumeMounts), or none; the chart's `auth`
     values decide, `config.auth.reload_interval_s` is kept. */}}
{{- if include "sdserve.authSecret" . }}
{{- $_ := set $pins "auth" (dict "enabled" true "keys_file" "/etc/sdserve/auth/keys.yaml") }}
{{- else }}
{{- $_ := set $pins "auth" (dict "enabled" false) }}
{{- end }}
{{- $config := mustMergeOverwrite (deepCopy .Values.config) $pins }}
{{- toYaml $config }}
{{- end }}

{{/*
The Ray Serve config: what `sdserve render-serve-config` writes for the AppConfig above. The base is that
command's output for an empty AppConfig, files/serve-config-defaults.yaml (generated: `sdserve
render-serve-config /dev/null -o charts/sdserve/files/serve-config-defaults.yaml`; tests/chart fails when it
is stale), so every setting the user leaves out appears with the application's default, and the structure
(import path, deployment names, gRPC servicer functions) is the renderer's, not a copy.
*/}}
{{- define "sdserve.serveConfig" -}}
{{- $serve := .Files.Get "files/serve-config-defaults.yaml" | fromYaml }}
{{- $base := index $serve.applications 0 }}
{{- $config := mustMergeOverwrite (deepCopy $base.args) (include "sdserve.appConfig" . | fromYaml) }}
{{- /* The catalog (every section the stage table names: models, upscalers, ...) is every deployment's
     user_config, not an arg: Serve applies a changed user_config in place (reconfigure, a rollout without
     restarts) but restarts every replica when args change. A section the config leaves out is []. */}}
{{- $table := .Files.Get "files/stages.yaml" | fromYaml }}
{{- $catalog := dict }}
{{- range $section := $table.catalogs }}
{{- $entries := list }}
{{- range (get $config $section | default list) }}
{{- /* ModelSpec / ArtifactSpec's one optional field, with its default, as the renderer writes it. */}}
{{- $entries = append $entries (mustMergeOverwrite (dict "description" "") .) }}
{{- end }}
{{- $_ := set $catalog $section $entries }}
{{- $_ := unset $config $section }}
{{- end }}
{{- /* The ingress (the renderer lists it first), then each deployed stage's deployment in table order. */}}
{{- $deployments := list (dict "name" (first $base.deployments).name "user_config" $catalog) }}
{{- range (include "sdserve.deployedStages" . | fromYaml).stages }}
{{- $deployments = append $deployments (dict "name" .deployment "user_config" $catalog) }}
{{- end }}
{{- $app := dict
  "name" $config.app_name
  "route_prefix" $config.route_prefix
  "import_path" $base.import_path
  "args" $config
  "deployments" $deployments
}}
{{- $_ := set $serve "http_options" $config.http }}
{{- $_ := set $serve "applications" (list $app) }}
{{- if $config.grpc.enabled }}
{{- $_ := set $serve.grpc_options "port" $config.grpc.port }}
{{- else }}
{{- $_ := unset $serve "grpc_options" }}
{{- end }}
{{- toYaml $serve }}
{{- end }}

{{/* Environment of every Ray container: cache paths, and secrets by reference only. */}}
{{- define "sdserve.env" -}}
- name: HOME
  value: /tmp/home
- name: SDSERVE_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf" .Values.modelCache.mountPath | quote }}
{{- with .Values.secrets.huggingface.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.huggingface.tokenKey }}
{{- end }}
{{- with .Values.secrets.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- with .Values.tracing }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- with .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with .resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "sdserve.keyValues" . | quote }}
{{- end }}
{{- with .existingSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.tracing.headersKey }}}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A map as `k1=v1,k2=v2` in key order (OTEL_RESOURCE_ATTRIBUTES). */}}
{{- define "sdserve.keyValues" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%v" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* The ConfigMap of style preset files, or "" when there is none. */}}
{{- define "sdserve.stylesConfigMap" -}}
{{- if .Values.stylePresets.existingConfigMap -}}
{{ .Values.stylePresets.existingConfigMap }}
{{- else if .Values.stylePresets.presets -}}
{{ include "sdserve.fullname" . }}-styles
{{- end -}}
{{- end }}

{{/*
The Secret holding the API key file, or "" when auth is off. Auth on without a Secret fails the render: the
service would not start without keys, so say how to make them (or how to choose an open service).
*/}}
{{- define "sdserve.authSecret" -}}
{{- if .Values.auth.enabled -}}
{{- if not .Values.auth.existingSecret -}}
{{- $how := list
  "auth.enabled is true (the default) but auth.existingSecret is empty: the service needs API keys."
  "  1. Create a key: `sdserve keys create --tenant <name>` prints the key (give it to the client) and its entry"
  "     for the key file; put the `keys:` entries of all your keys in one file, keys.yaml."
  (printf "  2. Store the file: `kubectl -n %s create secret generic sdserve-api-keys --from-file=%s=keys.yaml`." .Release.Namespace .Values.auth.key)
  "  3. Install with `--set auth.existingSecret=sdserve-api-keys`."
  "Or set auth.enabled=false to install an open service: anyone who reaches it can generate images."
}}
{{- fail (printf "\n\n%s" (join "\n" $how)) -}}
{{- end -}}
{{ .Values.auth.existingSecret }}
{{- end -}}
{{- end }}

{{/* Writable volumes of a read-only root filesystem: /tmp (Ray's /tmp/ray), /dev/shm, the model cache; and the
style presets' ConfigMap and the API key Secret, read-only. */}}
{{- define "sdserve.volumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
- name: model-cache
{{- if eq .Values.modelCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model-cache" (include "sdserve.fullname" .)) .Values.modelCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.size }}
{{- end }}
{{- with include "sdserve.stylesConfigMap" . }}
- name: styles
  configMap:
    name: {{ . }}
{{- end }}
{{- with include "sdserve.authSecret" . }}
- name: api-keys
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.auth.key }}
        path: keys.yaml
{{- end }}
{{- end }}

{{- define "sdserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
{{- if include "sdserve.stylesConfigMap" . }}
- name: styles
  mountPath: /etc/sdserve/styles
  readOnly: true
{{- end }}
{{- /* The directory, not the file (no subPath): kubelet updates a mounted Secret in place only without a
     subPath, and the service re-reads the file when it changes, so keys rotate without a restart. */}}
{{- if include "sdserve.authSecret" . }}
- name: api-keys
  mountPath: /etc/sdserve/auth
  readOnly: true
{{- end }}
{{- end }}

{{/*
A Ray pod template. Arguments: dict with "root" (the chart context), "component" (head / worker-<group>),
"container" (container name), "resources", "gpus", "ports", "nodeSelector", "tolerations", "affinity",
"podLabels", "podAnnotations".
*/}}
{{- define "sdserve.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "sdserve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with .podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "sdserve.serviceAccountName" $root }}
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "sdserve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
      env:
        {{- include "sdserve.env" $root | nindent 8 }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      volumeMounts:
        {{- include "sdserve.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "sdserve.volumes" $root | nindent 4 }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
