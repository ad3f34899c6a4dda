{{- define "kleidi.name" -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}

{{- define "kleidi.selectorLabels" -}}
app.kubernetes.io/name: kleidi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kleidi.labels" -}}
{{ include "kleidi.selectorLabels" . }}
app.kubernetes.io/component: kms-plugin
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The port of config.telemetry.address (default 9464): probes and metrics. */}}
{{- define "kleidi.telemetryPort" -}}
{{- $address := dig "telemetry" "address" "127.0.0.1:9464" .Values.config -}}
{{- regexFind "[0-9]+$" $address -}}
{{- end -}}

{{/* Refusals that name the value and the fix. */}}
{{- define "kleidi.validate" -}}
{{- if and .Values.secretCredentials.secretName (not .Values.acknowledgeSecretDependency) -}}
{{- fail "secretCredentials.secretName is set, but kleidi decrypts Secrets: after a cold boot the apiserver cannot read that Secret until kleidi runs, and kleidi cannot run without it. Put the credentials in host files (hostMounts, read-only) or set acknowledgeSecretDependency=true if another path brings kleidi up (docs/deploy/helm.md)." -}}
{{- end -}}
{{- $endpoint := dig "server" "endpoint" "unix:///var/run/kleidi/kleidi.sock" .Values.config -}}
{{- if and (eq .Values.configSource "configMap") (not (hasPrefix (printf "unix://%s/" .Values.socketHostPath) $endpoint)) -}}
{{- fail (printf "config.server.endpoint (%s) must be a socket in socketHostPath (%s), the directory shared with the kube-apiserver: set one to match the other." $endpoint .Values.socketHostPath) -}}
{{- end -}}
{{- if and (eq .Values.tpm.deviceAccess "none") (eq .Values.configSource "configMap") (eq (dig "backend" "kind" "local" .Values.config) "tpm") -}}
{{- fail "config.backend.kind is tpm but tpm.deviceAccess is none: the pod would not see the TPM. Set tpm.deviceAccess to privileged or devicePlugin (docs/deploy/helm.md explains both)." -}}
{{- end -}}
{{- end -}}
