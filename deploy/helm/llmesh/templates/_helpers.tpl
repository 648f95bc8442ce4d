{{/* Names, labels, images and the pieces every pod shares. */}}

{{- define "llmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmesh
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "llmesh.selector" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* In-cluster DNS name of a Service of this release: (dict "root" $ "name" "gateway"). */}}
{{- define "llmesh.host" -}}
{{- printf "%s-%s.%s.svc.%s" (include "llmesh.fullname" .root) .name .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* repository@digest, else repository:tag: (dict "image" .Values.image "default" .Chart.AppVersion). */}}
{{- define "llmesh.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "llmesh.image" -}}
{{- include "llmesh.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "llmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmesh.tlsSecret" -}}
{{- default (printf "%s-mesh-tls" (include "llmesh.fullname" .)) .Values.mtls.existingSecret -}}
{{- end -}}

{{- define "llmesh.redisSecret" -}}
{{- default (printf "%s-redis-auth" (include "llmesh.fullname" .)) .Values.redis.passwordSecret -}}
{{- end -}}

{{/* "exec" or "grpc": how the gRPC services are probed (values.yaml `probes`). */}}
{{- define "llmesh.probeMode" -}}
{{- $mode := .Values.probes.mode -}}
{{- if eq $mode "auto" -}}
{{- ternary "exec" "grpc" .Values.mtls.enabled -}}
{{- else if and (eq $mode "grpc") .Values.mtls.enabled -}}
{{- fail "probes.mode grpc cannot work with mtls.enabled: native gRPC probes present no client certificate" -}}
{{- else if has $mode (list "grpc" "exec") -}}
{{- $mode -}}
{{- else -}}
{{- fail (printf "probes.mode must be auto, grpc or exec, not %q" $mode) -}}
{{- end -}}
{{- end -}}

{{/* One gRPC health probe: (dict "root" $ "part" "gateway" "port" 50051 "service" "" "alive" bool).
alive: any answer counts (liveness, startup: a part whose dependency is down answers NOT_SERVING and must not be
restarted for it); otherwise SERVING is needed (readiness). Native probes want SERVING, so liveness is always exec. */}}
{{- define "llmesh.grpcProbe" -}}
{{- if or .alive (eq (include "llmesh.probeMode" .root) "exec") -}}
exec:
  command:
    - {{ .root.Values.probes.python }}
    - /etc/llmesh/probe/probe.py
    - grpc
    - "127.0.0.1:{{ .port }}"
    - --service={{ .service }}
    {{- if .alive }}
    - --alive
    {{- end }}
    {{- if .root.Values.mtls.enabled }}
    - --tls-dir=/etc/llmesh/tls
    - --part={{ .part }}
    {{- end }}
{{- else -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
{{- end }}
{{- end -}}

{{/* Probes of one gRPC part: readiness wants SERVING; liveness and startup want any answer. */}}
{{- define "llmesh.grpcProbes" -}}
{{- $ready := include "llmesh.grpcProbe" (merge (dict "alive" false) .) -}}
{{- $alive := include "llmesh.grpcProbe" (merge (dict "alive" true) .) -}}
{{- include "llmesh.probes" (dict "root" .root "ready" $ready "alive" $alive "startup" $alive) -}}
{{- end -}}

{{/* readiness, liveness and startup probes: (dict "root" $ "ready" <yaml> "alive" <yaml> "startup" <yaml>). */}}
{{- define "llmesh.probes" -}}
{{- $p := .root.Values.probes -}}
readinessProbe:
  {{- .ready | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
livenessProbe:
  {{- .alive | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
startupProbe:
  {{- .startup | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
{{- end -}}

{{/* Pod-level fields every workload shares. */}}
{{- define "llmesh.podCommon" -}}
serviceAccountName: {{ include "llmesh.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling of one part: its values block. */}}
{{- define "llmesh.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The secret volume of one part's mTLS files: ca.pem, <part>.pem, <part>.key only. */}}
{{- define "llmesh.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "llmesh.tlsSecret" .root }}
    defaultMode: 0440
    items:
      - { key: ca.pem, path: ca.pem }
      - { key: {{ .part }}.pem, path: {{ .part }}.pem }
      - { key: {{ .part }}.key, path: {{ .part }}.key }
{{- end -}}

{{- define "llmesh.probeVolume" -}}
- name: probe
  configMap:
    name: {{ include "llmesh.fullname" . }}-probe
    defaultMode: 0444
{{- end -}}

{{/* Volumes of the model repository (router, Triton). */}}
{{- define "llmesh.modelVolume" -}}
{{- $m := .Values.modelRepository -}}
- name: models
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "modelRepository.pvc.claimName is required with source pvc" $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "image" }}
  emptyDir:
    sizeLimit: {{ $m.image.sizeLimit }}
{{- else }}
{{- fail (printf "modelRepository.source must be image or pvc, not %q" $m.source) }}
{{- end }}
{{- end -}}

{{- define "llmesh.modelMount" -}}
- name: models
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
  {{- with .Values.modelRepository.pvc.subPath }}
  {{- if eq $.Values.modelRepository.source "pvc" }}
  subPath: {{ . }}
  {{- end }}
  {{- end }}
{{- end -}}

{{/* The init container that copies the repository out of the models image (source image). */}}
{{- define "llmesh.modelInit" -}}
{{- $m := .Values.modelRepository -}}
{{- if eq $m.source "image" }}
initContainers:
  - name: model-repository
    image: {{ include "llmesh.imageRef" (dict "image" $m.image "default" .Chart.AppVersion) }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c", "cp -R {{ $m.image.path }}/. /target/"]
    securityContext:
      {{- toYaml .Values.containerSecurityContext | nindent 6 }}
    resources:
      {{- toYaml $m.image.resources | nindent 6 }}
    volumeMounts:
      - { name: models, mountPath: /target }
{{- end }}
{{- end -}}

{{/* The Redis password file and, for rediss://, the TLS files: volumes. */}}
{{- define "llmesh.redisVolumes" -}}
- name: redis-auth
  secret:
    secretName: {{ include "llmesh.redisSecret" . }}
    defaultMode: 0440
    items:
      - { key: {{ .Values.redis.passwordKey }}, path: password }
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.secret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.external.tls.secret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "llmesh.redisMounts" -}}
- { name: redis-auth, mountPath: /etc/llmesh/redis, readOnly: true }
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.secret }}
- { name: redis-tls, mountPath: /etc/llmesh/redis-tls, readOnly: true }
{{- end }}
{{- end -}}

{{/* LLMESH_<PREFIX>_REDIS_* env: (dict "root" $ "prefix" "LLMESH_GATEWAY_"). */}}
{{- define "llmesh.redisEnv" -}}
- { name: {{ .prefix }}REDIS_PASSWORD_FILE, value: /etc/llmesh/redis/password }
{{- $r := .root.Values.redis -}}
{{- if and (eq $r.mode "external") $r.external.tls.secret }}
- { name: {{ .prefix }}REDIS_TLS_CA_FILE, value: /etc/llmesh/redis-tls/ca.crt }
{{- if $r.external.tls.clientCert }}
- { name: {{ .prefix }}REDIS_TLS_CERT_FILE, value: /etc/llmesh/redis-tls/tls.crt }
- { name: {{ .prefix }}REDIS_TLS_KEY_FILE, value: /etc/llmesh/redis-tls/tls.key }
{{- end }}
{{- end }}
{{- end -}}

{{/* Redis URLs by user: store (gateway keys), cache, limiter. */}}
{{- define "llmesh.redisUrl" -}}
{{- $r := .root.Values.redis -}}
{{- if eq $r.mode "inChart" -}}
{{- if eq .use "limiter" -}}
{{- printf "redis://%s:6379/0" (include "llmesh.host" (dict "root" .root "name" "redis-cluster")) -}}
{{- else -}}
{{- printf "redis://%s:6379/0" (include "llmesh.host" (dict "root" .root "name" "redis")) -}}
{{- end -}}
{{- else if eq $r.mode "external" -}}
{{- $url := required "redis.external.url is required with redis.mode external" $r.external.url -}}
{{- if eq .use "cache" -}}{{- default $url $r.external.cacheUrl -}}
{{- else if eq .use "limiter" -}}{{- default $url $r.external.limiterUrl -}}
{{- else -}}{{- $url -}}{{- end -}}
{{- else -}}
{{- fail (printf "redis.mode must be inChart or external, not %q" $r.mode) -}}
{{- end -}}
{{- end -}}

{{- define "llmesh.limiterRedisCluster" -}}
{{- if eq .Values.redis.mode "inChart" -}}true{{- else -}}{{- ternary "true" "false" .Values.redis.external.limiterCluster -}}{{- end -}}
{{- end -}}

{{/* mTLS env of a service: (dict "root" $ "prefix" "LLMESH_GATEWAY_" "part" "gateway"). */}}
{{- define "llmesh.tlsEnv" -}}
{{- if .root.Values.mtls.enabled }}
- { name: {{ .prefix }}TLS_CA_FILE, value: /etc/llmesh/tls/ca.pem }
- { name: {{ .prefix }}TLS_CERT_FILE, value: /etc/llmesh/tls/{{ .part }}.pem }
- { name: {{ .prefix }}TLS_KEY_FILE, value: /etc/llmesh/tls/{{ .part }}.key }
{{- end }}
{{- end -}}

{{/* The Triton headless Services' NAME:PORT list, shared (dedicated false) or dedicated: (dict "root" $ "dedicated" bool). */}}
{{- define "llmesh.tritonDns" -}}
{{- $names := list -}}
{{- range .root.Values.triton.variants -}}
{{- if eq (default false .dedicated) $.dedicated -}}
{{- $names = append $names (printf "%s:%v" (include "llmesh.host" (dict "root" $.root "name" (printf "triton-%s" .name))) $.root.Values.triton.grpcPort) -}}
{{- end -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
