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
Name of the Secret holding database-url, manager-token and worker-token.
Also checks that the credentials are given exactly one way, so a missing value
fails the install with a message rather than a crash-looping pod.
*/}}
{{- define "appproxy-coordinator.secretName" -}}
{{- if .Values.existingSecret }}
{{- if or .Values.database.url .Values.auth.managerToken .Values.auth.workerToken }}
{{- fail "existingSecret is set: leave database.url, auth.managerToken and auth.workerToken empty (the Secret holds them)" }}
{{- end }}
{{- .Values.existingSecret }}
{{- else }}
{{- $_ := required "database.url is required (postgres://user:password@host:5432/db), or set existingSecret to a Secret with the keys database-url, manager-token and worker-token" .Values.database.url }}
{{- $m := required "auth.managerToken is required (e.g. --set auth.managerToken=$(openssl rand -base64 32)), or set existingSecret" .Values.auth.managerToken }}
{{- $w := required "auth.workerToken is required (e.g. --set auth.workerToken=$(openssl rand -base64 32)), or set existingSecret" .Values.auth.workerToken }}
{{- if eq $m $w }}
{{- fail "auth.managerToken and auth.workerToken must differ: a worker must not be able to act as the Manager" }}
{{- end }}
{{- include "appproxy-coordinator.fullname" . }}
{{- end }}
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
