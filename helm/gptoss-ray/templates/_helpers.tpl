{{/* Name of every object of this release (KubeRay appends its own suffixes). */}}
{{- define "gptoss-ray.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the Ray pods of this release (NetworkPolicy, metrics Service). */}}
{{- define "gptoss-ray.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gptoss-ray.labels" -}}
{{ include "gptoss-ray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gptoss-ray.apiKeySecretName" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "gptoss-ray.fullname" .)) -}}
{{- end -}}

{{- define "gptoss-ray.modelCacheClaim" -}}
{{- .Values.model.cache.existingClaim | default (printf "%s-model-cache" (include "gptoss-ray.fullname" .)) -}}
{{- end -}}

{{/* Checks that values.schema.json cannot express (it sees one field at a time). */}}
{{- define "gptoss-ray.checks" -}}
{{- $ep := int .Values.engine.epSize -}}
{{- $gpus := int .Values.worker.gpus -}}
{{- if ne (mod $gpus $ep) 0 -}}
{{- fail (printf "worker.gpus (%d) must be a multiple of engine.epSize (%d): each model instance takes epSize GPUs of one pod" $gpus $ep) -}}
{{- end -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if gt (int .Values.serve.ingress.minReplicas) (int .Values.serve.ingress.maxReplicas) -}}
{{- fail "serve.ingress.minReplicas must not exceed serve.ingress.maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* build_app arguments: the model, EngineConfig fields (snake_case). */}}
{{- define "gptoss-ray.appArgs" -}}
{{- $e := .Values.engine -}}
{{- $args := dict
  "model" .Values.model.name
  "ep_size" (int $e.epSize)
  "dtype" $e.dtype
  "kv_cache_memory_gb" $e.kvCacheMemoryGb
  "max_num_seqs" (int $e.maxNumSeqs)
  "max_num_batched_tokens" (int $e.maxNumBatchedTokens)
  "block_size" (int $e.blockSize)
  "enable_prefix_caching" $e.enablePrefixCaching
  "placement_strategy" $e.placementStrategy
-}}
{{- if $e.maxModelLen -}}
{{- $_ := set $args "max_model_len" (int $e.maxModelLen) -}}
{{- end -}}
{{- $_ := set $args "max_queued_requests" (int .Values.serve.maxQueuedRequests) -}}
{{- $r := .Values.responses | default dict -}}
{{- with $r.ttlSeconds -}}
{{- $_ := set $args "responses_ttl_s" (int .) -}}
{{- end -}}
{{- if and $r.store (not ($r.postgres | default dict).existingSecret) -}}
{{- $_ := set $args "responses_store" $r.store -}}
{{- end -}}
{{- toYaml (merge $args ($e.extra | default dict)) -}}
{{- end -}}

{{/* The Ray Serve config (deploy/serve_config.yaml with these values). */}}
{{- define "gptoss-ray.serveConfig" -}}
{{- $a := .Values.autoscaling -}}
{{- $s := .Values.serve -}}
{{- $e := .Values.engine -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: 8000
  request_timeout_s: {{ $s.requestTimeoutS }}
  keep_alive_timeout_s: 75
logging_config:
  encoding: JSON
  log_level: INFO
applications:
  - name: gptoss
    route_prefix: /
    import_path: gptoss_ray.serve:build_app
    args:
      {{- include "gptoss-ray.appArgs" . | nindent 6 }}
    deployments:
      - name: OpenAIIngress
        max_ongoing_requests: {{ $s.ingress.maxOngoingRequests | default 1024 }}
        max_queued_requests: {{ $s.ingress.maxQueuedRequests | default 256 }}
        backpressure_config:
          status_code: 429
          retry_after_s: 1
        autoscaling_config:
          min_replicas: {{ $s.ingress.minReplicas }}
          max_replicas: {{ $s.ingress.maxReplicas }}
          target_ongoing_requests: {{ $s.ingress.targetOngoingRequests | default 256 }}
          upscale_delay_s: 30
          downscale_delay_s: 300
        ray_actor_options:
          num_cpus: 1
      - name: LLMServer
        max_ongoing_requests: {{ $e.maxNumSeqs }}
        max_queued_requests: {{ add $e.maxNumSeqs $s.maxQueuedRequests }}
        autoscaling_config:
          min_replicas: {{ $a.minReplicas }}
          initial_replicas: {{ $a.initialReplicas | default $a.minReplicas }}
          max_replicas: {{ $a.maxReplicas }}
          target_ongoing_requests: {{ $a.targetOngoingRequests }}
          upscale_delay_s: {{ $a.upscaleDelayS }}
          downscale_delay_s: {{ $a.downscaleDelayS }}
          look_back_period_s: 60
        health_check_period_s: 30
        health_check_timeout_s: 120
        graceful_shutdown_timeout_s: 300
        ray_actor_options:
          num_cpus: 1
{{- end -}}

{{/* Environment of every Ray container: the API key, the Hugging Face cache. */}}
{{- define "gptoss-ray.env" -}}
- name: GPTOSS_RAY_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss-ray.apiKeySecretName" . }}
      key: api-key
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.model.cache.mountPath }}
{{- with ((.Values.responses | default dict).postgres | default dict) }}
{{- if .existingSecret }}
- name: GPTOSS_RAY_RESPONSES_STORE
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key | default "url" }}
{{- end }}
{{- end }}
{{- with .Values.model.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: token
{{- end }}
{{- end -}}
