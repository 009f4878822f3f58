{{/*
Chart name, truncated to 63 characters (the limit of a DNS label).
*/}}
{{- define "appproxy-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: "<release>-<chart>", or the release name
alone when it already contains the chart name.
*/}}
{{- define "appproxy-coordinator.fullname" -}}
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

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "appproxy-coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every resource carries.
*/}}
{{- define "appproxy-coordinator.labels" -}}
helm.sh/chart: {{ include "appproxy-coordinator.chart" . }}
{{ include "appproxy-coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: appproxy
{{- end }}

{{/*
Labels that select the coordinator pods (immutable once installed).
*/}}
{{- define "appproxy-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "appproxy-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: coordinator
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "appproxy-coordinator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "appproxy-coordinator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"true" when the coordinator runs on PostgreSQL (database.url, or the
database-url key of existingSecret), empty on the embedded SQLite file.
*/}}
{{- define "appproxy-coordinator.postgres" -}}
{{- if or .Values.database.url .Values.existingSecret }}true{{ end }}
{{- end }}

{{/*
Name of the Secret holding manager-token, worker-token, on PostgreSQL
database-url, and with backendai.enabled backendai-api-secret,
backendai-jwt-secret and redis-url. Also checks that the values make sense
together, so a mistake fails the install with a message rather than a crash-looping pod. (The schema
refuses replicaCount > 1 on SQLite too; this message is for installs that skip
schema validation.)
*/}}
{{- define "appproxy-coordinator.secretName" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "appproxy-coordinator.postgres" .)) }}
{{- fail (printf "replicaCount is %d, but the embedded SQLite database serves exactly one pod: set database.url (PostgreSQL) or existingSecret, or use replicaCount 1" (int .Values.replicaCount)) }}
{{- end }}
{{- if .Values.existingSecret }}
{{- if or .Values.database.url .Values.auth.managerToken .Values.auth.workerToken }}
{{- fail "existingSecret is set: leave database.url, auth.managerToken and auth.workerToken empty (the Secret holds them)" }}
{{- end }}
{{- if or .Values.backendai.apiSecret .Values.backendai.jwtSecret .Values.backendai.redisUrl }}
{{- fail "existingSecret is set: leave backendai.apiSecret, backendai.jwtSecret and backendai.redisUrl empty (the Secret holds them as backendai-api-secret, backendai-jwt-secret and redis-url)" }}
{{- end }}
{{- if .Values.ui.viewerToken }}
{{- fail "existingSecret is set: leave ui.viewerToken empty (put it in the Secret as viewer-token)" }}
{{- end }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "appproxy-coordinator.fullname" . }}
{{- end }}
{{- end }}

{{/*
The data of the chart's Secret (base64, as YAML), when existingSecret is
empty. Each token is auth.* when set, else the one already stored in the
Secret (lookup: an upgrade keeps it), else 48 random alphanumeric characters
(about 285 bits, from crypto/rand). The result is remembered for the rest of
the render, so that the checksum/secret annotation of the pods hashes the very
tokens the Secret holds, not a second random draw.
*/}}
{{- define "appproxy-coordinator.secretData" -}}
{{- if not (hasKey . "appproxyCoordinatorSecretData") }}
{{- $name := include "appproxy-coordinator.secretName" . }}
{{- $stored := dig "data" (dict) (lookup "v1" "Secret" .Release.Namespace $name) }}
{{- $data := dict }}
{{- with .Values.database.url }}
{{- $_ := set $data "database-url" (b64enc .) }}
{{- end }}
{{- range $key, $value := dict "manager-token" .Values.auth.managerToken "worker-token" .Values.auth.workerToken }}
{{- if $value }}
{{- $_ := set $data $key (b64enc $value) }}
{{- else if index $stored $key }}
{{- $_ := set $data $key (index $stored $key) }}
{{- else }}
{{- $_ := set $data $key (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- end }}
{{- if eq (index $data "manager-token") (index $data "worker-token") }}
{{- fail "auth.managerToken and auth.workerToken must differ: a worker must not be able to act as the Manager" }}
{{- end }}
{{- with .Values.ui.viewerToken }}
{{- $_ := set $data "viewer-token" (b64enc .) }}
{{- end }}
{{- /* Backend.AI: the same rules for its two secrets; while backendai.enabled
is false, secrets a former install stored are carried over untouched, so
turning the mode off and on again does not change them behind the Manager's
and the workers' backs. */}}
{{- range $key, $value := dict "backendai-api-secret" .Values.backendai.apiSecret "backendai-jwt-secret" .Values.backendai.jwtSecret }}
{{- if and $.Values.backendai.enabled $value }}
{{- $_ := set $data $key (b64enc $value) }}
{{- else if index $stored $key }}
{{- $_ := set $data $key (index $stored $key) }}
{{- else if $.Values.backendai.enabled }}
{{- $_ := set $data $key (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- end }}
{{- if .Values.backendai.enabled }}
{{- $_ := set $data "redis-url" (b64enc .Values.backendai.redisUrl) }}
{{- with .Values.backendai.coreRedisUrl }}
{{- $_ := set $data "backendai-core-redis-url" (b64enc .) }}
{{- end }}
{{- end }}
{{- $_ := set . "appproxyCoordinatorSecretData" (toYaml $data) }}
{{- end }}
{{- index . "appproxyCoordinatorSecretData" }}
{{- end }}

{{/*
Checks the backendai values that the schema cannot (and, for installs that
skip schema validation, those it can), in a sentence.
*/}}
{{- define "appproxy-coordinator.checkBackendai" -}}
{{- if .Values.backendai.enabled }}
{{- $redisTls := .Values.backendai.redisTls }}
{{- if and $redisTls.caSecret $redisTls.caConfigMap }}
{{- fail "backendai.redisTls: set caSecret or caConfigMap, not both" }}
{{- end }}
{{- if and (include "appproxy-coordinator.redisTls" .) .Values.backendai.redisUrl (not (regexMatch "^(rediss|valkeys)(\\+sentinel)?://" .Values.backendai.redisUrl)) }}
{{- fail "backendai.redisTls is for TLS, which needs a rediss:// (or rediss+sentinel://) backendai.redisUrl (the coordinator refuses a CA or client certificate with redis://)" }}
{{- end }}
{{- if not (or .Values.backendai.redisUrl .Values.existingSecret .Values.backendai.redisSentinel) }}
{{- fail "backendai.enabled needs backendai.redisUrl (redis://host:6379) or backendai.redisSentinel: the Backend.AI workers learn their circuits over Redis; or put it in existingSecret as redis-url" }}
{{- end }}
{{- if ne (empty .Values.backendai.redisSentinel) (empty .Values.backendai.redisServiceName) }}
{{- fail "backendai.redisSentinel and backendai.redisServiceName go together" }}
{{- end }}
{{- if ne (empty .Values.backendai.coreRedisSentinel) (empty .Values.backendai.coreRedisServiceName) }}
{{- fail "backendai.coreRedisSentinel and backendai.coreRedisServiceName go together" }}
{{- end }}
{{- if and .Values.backendai.servicePort (eq (int .Values.backendai.servicePort) (int .Values.service.port)) }}
{{- fail (printf "backendai.servicePort (%d) is service.port already: leave it empty, or pick another port (e.g. 10200)" (int .Values.backendai.servicePort)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What the coordinator reports as its own URL in Backend.AI's GET /status:
backendai.advertisedUrl, else the in-cluster URL of the Service.
*/}}
{{- define "appproxy-coordinator.backendaiAdvertisedUrl" -}}
{{- if .Values.backendai.advertisedUrl }}
{{- .Values.backendai.advertisedUrl | trimSuffix "/" }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d" (include "appproxy-coordinator.portName" .) (include "appproxy-coordinator.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/*
Name of the coordinator's port, and so its scheme: "https" when it serves TLS.
*/}}
{{- define "appproxy-coordinator.portName" -}}
{{- if .Values.tls.secretName }}https{{ else }}http{{ end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is given, else
repository:tag (the tag defaulting to the chart's appVersion).
*/}}
{{- define "appproxy-coordinator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Checks that the termination grace period covers the preStop sleep and the
coordinator's own graceful shutdown (the grace period must be strictly larger).
*/}}
{{- define "appproxy-coordinator.checkGracePeriod" -}}
{{- $need := add .Values.preStopSleepSeconds .Values.config.shutdownTimeoutSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than preStopSleepSeconds + config.shutdownTimeoutSeconds (%d), or Kubernetes kills the coordinator before its graceful shutdown ends" (int .Values.terminationGracePeriodSeconds) (int $need)) }}
{{- end }}
{{- end }}

{{/*
TLS to the backing stores: "true" when a CA or a client certificate is
configured for PostgreSQL (database.tls) or Redis (backendai.redisTls), whose
files are then mounted (see "appproxy-coordinator.tlsVolume").
*/}}
{{- define "appproxy-coordinator.checkDatabaseTls" -}}
{{- with .Values.database.tls }}
{{- if and .caSecret .caConfigMap }}
{{- fail "database.tls: set caSecret or caConfigMap, not both" }}
{{- end }}
{{- if and (or .sslMode .caSecret .caConfigMap .clientSecret) (not (include "appproxy-coordinator.postgres" $)) }}
{{- fail "database.tls is for PostgreSQL: set database.url or existingSecret too (the embedded SQLite database has no connection to encrypt)" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "appproxy-coordinator.databaseTls" -}}
{{- with .Values.database.tls }}{{ if or .caSecret .caConfigMap .clientSecret }}true{{ end }}{{ end }}
{{- end }}

{{- define "appproxy-coordinator.redisTls" -}}
{{- if .Values.backendai.enabled }}{{ with .Values.backendai.redisTls }}{{ if or .caSecret .caConfigMap .clientSecret }}true{{ end }}{{ end }}{{ end }}
{{- end }}

{{/*
The sslmode for PostgreSQL: database.tls.sslMode, else verify-full when a CA
is given (a CA that is not checked would be no protection), else none (the
URL's, by default prefer).
*/}}
{{- define "appproxy-coordinator.sslMode" -}}
{{- with .Values.database.tls }}{{ if .sslMode }}{{ .sslMode }}{{ else if or .caSecret .caConfigMap }}verify-full{{ end }}{{ end }}
{{- end }}

{{/*
A projected volume with a store's TLS files: the CA as ca.crt (from a Secret
or a ConfigMap), the client certificate as tls.crt and tls.key. Called with
(dict "name" <volume name> "tls" <the values>).
*/}}
{{- define "appproxy-coordinator.tlsVolume" -}}
- name: {{ .name }}
  projected:
    # Readable by the pod's fsGroup (podSecurityContext), not by others.
    defaultMode: 0440
    sources:
      {{- if .tls.caSecret }}
      - secret:
          name: {{ .tls.caSecret }}
          items:
            - key: {{ .tls.caKey }}
              path: ca.crt
      {{- else if .tls.caConfigMap }}
      - configMap:
          name: {{ .tls.caConfigMap }}
          items:
            - key: {{ .tls.caKey }}
              path: ca.crt
      {{- end }}
      {{- if .tls.clientSecret }}
      - secret:
          name: {{ .tls.clientSecret }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
{{- end }}
