{{/* Names, labels and the worker lists the router is given. */}}

{{/* At most 40 characters: a StatefulSet's name plus "-prefill" must leave room for the
controller-revision-hash label Kubernetes derives from it (63 characters at most). */}}
{{- define "baton.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "baton.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "baton.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The pools this release runs: [prefill, decode] or, aggregated, [decode] doing both. */}}
{{- define "baton.pools" -}}
{{- if eq .Values.mode "aggregated" -}}decode{{- else -}}prefill,decode{{- end -}}
{{- end -}}

{{/* host:port of every worker of pool (dict "root" $ "pool" "decode"), comma-separated. */}}
{{- define "baton.workerList" -}}
{{- $root := .root -}}
{{- $pool := index $root.Values .pool -}}
{{- $name := printf "%s-%s" (include "baton.fullname" $root) .pool -}}
{{- $out := list -}}
{{- range $i := until (int $pool.replicas) -}}
{{- $out = append $out (printf "%s-%d.%s.%s.svc:%d" $name $i $name $root.Release.Namespace (int $pool.port)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{- define "baton.redisUrl" -}}
{{- if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else -}}
redis://{{ include "baton.fullname" . }}-redis:6379
{{- end -}}
{{- end -}}

{{- define "baton.modelVolume" -}}
{{- if .Values.model.volume }}
- name: models
{{ toYaml .Values.model.volume | indent 2 }}
{{- end }}
{{- end -}}

{{- define "baton.modelMount" -}}
{{- if .Values.model.volume }}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}
