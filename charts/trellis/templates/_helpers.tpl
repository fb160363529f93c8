{{/*
Labels on every object: the ones the kustomize manifests carry (part-of: trellis, which
`kubectl wait ... -l app.kubernetes.io/part-of=trellis` relies on) plus Helm's own.
*/}}
{{- define "trellis.labels" -}}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Labels of one component's objects; the argument is (list $ "trellis-ca"). */}}
{{- define "trellis.componentLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
{{ include "trellis.labels" $root }}
{{- end }}

{{/* The trellis image, by tag (the chart's appVersion unless image.tag says otherwise). */}}
{{- define "trellis.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{- define "trellis.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The CA's in-cluster address, as agents dial it. */}}
{{- define "trellis.caHost" -}}
{{- printf "trellis-ca.%s.svc" .Release.Namespace -}}
{{- end }}

{{/*
Refuse combinations the schema cannot express, with one line that says what to change.
*/}}
{{- define "trellis.validate" -}}
{{- if and (eq .Values.redirect.default "cni") (not .Values.cni.enabled) -}}
{{- fail "redirect.default=cni needs cni.enabled=true: without the trellis-cni plugin on the nodes, injected pods would run with no redirect" -}}
{{- end -}}
{{- end }}

{{/*
A monitoring file of manifests/ (Prometheus configuration, ServiceMonitor, ...) with this
site's values in place of the ones the file is written for: the namespace trellis-system,
and the `cluster` and `trust_domain` labels its relabelling rules add to every target
(`target_label: cluster` / `targetLabel: cluster`, then `replacement: VALUE`). Text, not a
YAML round trip, so the file keeps its comments. The argument is (list $ TEXT).
*/}}
{{- define "trellis.siteText" -}}
{{- $root := index . 0 -}}
{{- $text := index . 1 | replace "trellis-system" $root.Release.Namespace -}}
{{- range $label, $value := dict "cluster" $root.Values.clusterName "trust_domain" $root.Values.trustDomain -}}
{{- $text = regexReplaceAll (printf "((?:target_label|targetLabel): %s\\s*\\n\\s*replacement: )\\S+" $label) $text (printf "${1}%s" $value) -}}
{{- end -}}
{{- $text -}}
{{- end }}
