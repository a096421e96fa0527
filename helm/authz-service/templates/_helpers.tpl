{{/* The release's full name, capped at 63 characters (a DNS label). */}}
{{- define "authz.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "authz.registryName" -}}
{{- printf "%s-registry" (include "authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "authz.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: authz-service
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "authz.selectorLabels" -}}
app.kubernetes.io/name: authz-service
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "authz.registrySelectorLabels" -}}
app.kubernetes.io/name: client-registry
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "authz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "authz.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "authz.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The registry URL authz-service uses: the one given, or the registry this chart deploys. */}}
{{- define "authz.registryUrl" -}}
{{- if .Values.registry.url -}}
{{- .Values.registry.url -}}
{{- else if .Values.registryServer.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "authz.registryName" .) .Release.Namespace (int .Values.registryServer.port) -}}
{{- end -}}
{{- end -}}

{{/* The Secret and key holding the registry's service token, if any. */}}
{{- define "authz.registryTokenRef" -}}
{{- if .Values.registry.tokenSecret.name -}}
name: {{ .Values.registry.tokenSecret.name }}
key: {{ .Values.registry.tokenSecret.key }}
{{- else if .Values.registry.token -}}
name: {{ include "authz.fullname" . }}
key: registry-token
{{- else if and .Values.registryServer.enabled .Values.registryServer.tokens.existingSecret -}}
name: {{ .Values.registryServer.tokens.existingSecret }}
key: service-token
{{- else if and .Values.registryServer.enabled .Values.registryServer.tokens.serviceToken -}}
name: {{ include "authz.registryName" . }}
key: service-token
{{- end -}}
{{- end -}}

{{- define "authz.terminationGracePeriod" -}}
{{- add (ceil .Values.shutdown.drainDelay) (ceil .Values.shutdown.grace) 5 -}}
{{- end -}}

{{/*
Contradictions that the schema cannot express fail the render here, each with the values to fix.
*/}}
{{- define "authz.validate" -}}
{{- $v := .Values -}}
{{- if eq $v.registry.mode "static" -}}
  {{- if and (not $v.keysFile.existingSecret) (not $v.keysFile.content) -}}
    {{- fail "registry.mode=static needs the keys file: set keysFile.existingSecret or keysFile.content (authz-service keys add writes one)" -}}
  {{- end -}}
{{- else -}}
  {{- if not (include "authz.registryUrl" .) -}}
    {{- fail (printf "registry.mode=%s needs registry.url, or registryServer.enabled=true" $v.registry.mode) -}}
  {{- end -}}
  {{- if not (include "authz.registryTokenRef" .) -}}
    {{- fail (printf "registry.mode=%s needs the registry's service token: registry.tokenSecret.name, registry.token, or registryServer.tokens" $v.registry.mode) -}}
  {{- end -}}
  {{- if $v.keysFile.existingSecret -}}
    {{- fail (printf "keysFile is only read with registry.mode=static, not %s: remove keysFile.existingSecret" $v.registry.mode) -}}
  {{- end -}}
{{- end -}}
{{- if and $v.redis.url $v.redis.existingSecret -}}
  {{- fail "redis.url and redis.existingSecret are both set: choose one" -}}
{{- end -}}
{{- if and $v.accessLogToken.value $v.accessLogToken.existingSecret -}}
  {{- fail "accessLogToken.value and accessLogToken.existingSecret are both set: choose one" -}}
{{- end -}}
{{- if and (not $v.ports.accessLog) (or $v.accessLogToken.value $v.accessLogToken.existingSecret) -}}
  {{- fail "accessLogToken is set but ports.accessLog=0 turns the access-log service off" -}}
{{- end -}}
{{- if and $v.policy.existingConfigMap $v.policy.content -}}
  {{- fail "policy.existingConfigMap and policy.content are both set: choose one" -}}
{{- end -}}
{{- if ge (float64 $v.registry.timeout) (float64 $v.checkTimeout) -}}
  {{- fail (printf "registry.timeout (%v) must be below checkTimeout (%v), or checks time out before the registry does" $v.registry.timeout $v.checkTimeout) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
  {{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (eq (toString $v.podDisruptionBudget.maxUnavailable) "0%") -}}
  {{- fail "podDisruptionBudget.maxUnavailable=0% blocks every node drain: allow at least one pod" -}}
{{- end -}}
{{- if and $v.serviceMonitor.enabled (not (hasSuffix "s" $v.serviceMonitor.interval)) (not (hasSuffix "m" $v.serviceMonitor.interval)) -}}
  {{- fail "serviceMonitor.interval: use seconds or minutes, such as 30s" -}}
{{- end -}}
{{- range $name, $_ := $v.settings -}}
  {{- if has $name (list "AUTHZ_GRPC_ADDRESS" "AUTHZ_GRPC_WORKERS" "AUTHZ_ACCESS_LOG_ADDRESS" "AUTHZ_ACCESS_LOG_TOKEN" "AUTHZ_HTTP_ADDRESS" "AUTHZ_HTTP_CHECK_ADDRESS" "AUTHZ_REGISTRY" "AUTHZ_REGISTRY_URL" "AUTHZ_REGISTRY_TOKEN" "AUTHZ_KEYS_FILE" "AUTHZ_POLICY_FILE" "AUTHZ_REDIS_URL" "AUTHZ_CHECK_TIMEOUT" "AUTHZ_REGISTRY_TIMEOUT" "AUTHZ_DRAIN_DELAY" "AUTHZ_SHUTDOWN_GRACE" "AUTHZ_LOG_LEVEL") -}}
    {{- fail (printf "settings.%s is set by the chart from its own values: use those instead" $name) -}}
  {{- end -}}
{{- end -}}
{{- if and (not $v.tracing.enabled) (or $v.tracing.endpoint $v.tracing.env) -}}
  {{- fail "tracing.endpoint or tracing.env is set but tracing.enabled is false: turn it on, or remove them" -}}
{{- end -}}
{{- if and $v.tracing.samplerArg (not (contains "traceidratio" $v.tracing.sampler)) -}}
  {{- fail (printf "tracing.samplerArg is only read by the traceidratio samplers, not by %s" $v.tracing.sampler) -}}
{{- end -}}
{{- range $name, $_ := $v.tracing.env -}}
  {{- if has $name (list "OTEL_TRACES_EXPORTER" "OTEL_EXPORTER_OTLP_ENDPOINT" "OTEL_SERVICE_NAME" "OTEL_TRACES_SAMPLER" "OTEL_TRACES_SAMPLER_ARG") -}}
    {{- fail (printf "tracing.env.%s is set by the chart from its own tracing values: use those instead" $name) -}}
  {{- end -}}
{{- end -}}
{{- if $v.registryServer.enabled -}}
  {{- $tokens := $v.registryServer.tokens -}}
  {{- if and (not $tokens.existingSecret) (or (not $tokens.adminToken) (not $tokens.serviceToken)) -}}
    {{- fail "registryServer needs its tokens: registryServer.tokens.existingSecret, or both adminToken and serviceToken" -}}
  {{- end -}}
  {{- if and $tokens.existingSecret (or $tokens.adminToken $tokens.serviceToken) -}}
    {{- fail "registryServer.tokens.existingSecret and token values are both set: choose one" -}}
  {{- end -}}
  {{- if and (eq $v.registryServer.database.type "sqlite") (gt (int $v.registryServer.replicaCount) 1) -}}
    {{- fail "registryServer.database.type=sqlite runs one replica (one file on one volume): use postgresql for more" -}}
  {{- end -}}
  {{- if and (eq $v.registryServer.database.type "postgresql") (not $v.registryServer.database.existingSecret) -}}
    {{- fail "registryServer.database.type=postgresql needs registryServer.database.existingSecret (holding the database URL)" -}}
  {{- end -}}
{{- end -}}
{{- end -}}
