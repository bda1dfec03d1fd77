{{/*
Expand the name of the chart.
*/}}
{{- define "primeintellect-build-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, truncated at 63 characters (DNS label limit).
If the release name contains the chart name, the release name is used alone.
*/}}
{{- define "primeintellect-build-exporter.fullname" -}}
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
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "primeintellect-build-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "primeintellect-build-exporter.labels" -}}
helm.sh/chart: {{ include "primeintellect-build-exporter.chart" . }}
{{ include "primeintellect-build-exporter.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "primeintellect-build-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "primeintellect-build-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the service account to use.
*/}}
{{- define "primeintellect-build-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "primeintellect-build-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API key: an existing one, or the one this chart creates.
*/}}
{{- define "primeintellect-build-exporter.secretName" -}}
{{- default (include "primeintellect-build-exporter.fullname" .) .Values.apiKey.existingSecret }}
{{- end }}

{{/*
The key inside that Secret.
*/}}
{{- define "primeintellect-build-exporter.secretKey" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/*
The container image: repository, then a digest if given, else the tag (default: appVersion).
*/}}
{{- define "primeintellect-build-exporter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Where things live inside the container. Each volume is mounted as a directory, never with
subPath: the kubelet updates a directory mount in place when its ConfigMap or Secret changes
(a subPath mount keeps the first version), and the exporter re-reads every one of these
files when it changes.
*/}}
{{- define "primeintellect-build-exporter.configDir" -}}
/etc/primeintellect-build-exporter
{{- end }}

{{- define "primeintellect-build-exporter.configFilePath" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/config/config.yaml
{{- end }}

{{- define "primeintellect-build-exporter.buildsFile" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/builds/builds.txt
{{- end }}

{{- define "primeintellect-build-exporter.apiKeyFile" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/secrets/api-key
{{- end }}

{{- define "primeintellect-build-exporter.webDir" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/web
{{- end }}

{{- define "primeintellect-build-exporter.tlsDir" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/tls
{{- end }}

{{- define "primeintellect-build-exporter.stateDir" -}}
/var/lib/primeintellect-build-exporter
{{- end }}

{{/*
The image's Python, which runs the exec probe (python -m exporter.probe).
*/}}
{{- define "primeintellect-build-exporter.python" -}}
/opt/venv/bin/python
{{- end }}

{{/*
The basic-auth user the probes log in as; its password is in the web config Secret.
*/}}
{{- define "primeintellect-build-exporter.probeUser" -}}
kubernetes-probe
{{- end }}

{{/*
"true" when the exporter serves https, "" otherwise.
*/}}
{{- define "primeintellect-build-exporter.tls" -}}
{{- if .Values.webConfig.tls.secretName }}true{{ end }}
{{- end }}

{{/*
"true" when basic auth is on, "" otherwise.
*/}}
{{- define "primeintellect-build-exporter.basicAuth" -}}
{{- if .Values.webConfig.basicAuthUsers }}true{{ end }}
{{- end }}

{{/*
"true" when the exporter gets a web config file (TLS or basic auth), "" otherwise.
*/}}
{{- define "primeintellect-build-exporter.webConfig" -}}
{{- if or (include "primeintellect-build-exporter.tls" .) (include "primeintellect-build-exporter.basicAuth" .) }}true{{ end }}
{{- end }}

{{/*
What the chart refuses to render, each with the value to set.
*/}}
{{- define "primeintellect-build-exporter.validate" -}}
{{- if and (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) }}
{{- fail "no Prime Intellect API key: set apiKey.existingSecret to the name of a Secret holding it (kubectl create secret generic primeintellect-api-key --from-file=api-key=./api-key), or apiKey.value to the key itself" }}
{{- end }}
{{- if hasKey .Values.webConfig.basicAuthUsers (include "primeintellect-build-exporter.probeUser" .) }}
{{- fail (printf "webConfig.basicAuthUsers: %s is the chart's own probe user; pick another name" (include "primeintellect-build-exporter.probeUser" .)) }}
{{- end }}
{{- if and (include "primeintellect-build-exporter.basicAuth" .) .Values.serviceMonitor.enabled (not .Values.serviceMonitor.basicAuth) }}
{{- fail "webConfig.basicAuthUsers turns on basic auth, so Prometheus must log in: set serviceMonitor.basicAuth to the username and password keys of a Secret in the ServiceMonitor's namespace (see the chart's README)" }}
{{- end }}
{{- end }}

{{/*
The spec of the state volume's claim, for the PersistentVolumeClaim and volumeClaimTemplates.
*/}}
{{- define "primeintellect-build-exporter.stateClaimSpec" -}}
accessModes:
  {{- toYaml .Values.persistence.accessModes | nindent 2 }}
{{- with .Values.persistence.storageClassName }}
storageClassName: {{ . | quote }}
{{- end }}
resources:
  requests:
    storage: {{ .Values.persistence.size }}
{{- end }}

{{/*
The exporter's config file: the `config` value without `builds` (they go to the builds
ConfigMap, read as a build file), plus what the chart decides itself: the key file it
mounts, the port it exposes, the state file, and the builds file. Relative build_files are
made absolute from the directory the config file was first mounted in, where they started.
*/}}
{{- define "primeintellect-build-exporter.configFile" -}}
{{- $config := omit (deepCopy .Values.config) "builds" }}
{{- $api := get $config "api" | default dict }}
{{- $_ := set $api "api_key_file" (include "primeintellect-build-exporter.apiKeyFile" .) }}
{{- $_ = set $config "api" $api }}
{{- $buildFiles := list }}
{{- range .Values.config.build_files }}
{{- if or (hasPrefix "/" .) (hasPrefix "~" .) }}
{{- $buildFiles = append $buildFiles . }}
{{- else }}
{{- $buildFiles = append $buildFiles (printf "%s/%s" (include "primeintellect-build-exporter.configDir" $) .) }}
{{- end }}
{{- end }}
{{- $_ = set $config "build_files" (append $buildFiles (include "primeintellect-build-exporter.buildsFile" .)) }}
{{- $_ = set $config "web" (dict "listen_address" (printf ":%d" (int .Values.containerPort))) }}
{{- $_ = set $config "state" (dict "path" (printf "%s/state.db" (include "primeintellect-build-exporter.stateDir" .))) }}
{{- toYaml $config }}
{{- end }}

{{/*
The builds file: config.builds, one ID a line.
*/}}
{{- define "primeintellect-build-exporter.buildsFileText" -}}
# config.builds of the Helm release {{ .Release.Name }}; the exporter re-reads it when it changes.
{{- range .Values.config.builds }}
{{ . }}
{{- end }}
{{- end }}

{{/*
A probe from the livenessProbe or readinessProbe value (`probe`): an httpGet probe is sent
over https when TLS is on, and becomes an exec probe that logs in with the password file of
the web config Secret when basic auth is on, so no password is in the pod spec.
*/}}
{{- define "primeintellect-build-exporter.probe" -}}
{{- $root := .root }}
{{- $probe := deepCopy .probe }}
{{- if hasKey $probe "httpGet" }}
{{- if include "primeintellect-build-exporter.basicAuth" $root }}
{{- $scheme := ternary "https" "http" (eq (include "primeintellect-build-exporter.tls" $root) "true") }}
{{- $url := printf "%s://127.0.0.1:%d%s" $scheme (int $root.Values.containerPort) ($probe.httpGet.path | default "/") }}
{{- $command := list (include "primeintellect-build-exporter.python" $root) "-m" "exporter.probe" $url "--user" (include "primeintellect-build-exporter.probeUser" $root) "--password-file" (printf "%s/probe-password" (include "primeintellect-build-exporter.webDir" $root)) }}
{{- $_ := unset $probe "httpGet" }}
{{- $_ = set $probe "exec" (dict "command" $command) }}
{{- else if include "primeintellect-build-exporter.tls" $root }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
The pod template shared by the Deployment (one shard) and the StatefulSet (several).
*/}}
{{- define "primeintellect-build-exporter.podTemplate" -}}
{{- include "primeintellect-build-exporter.validate" . }}
metadata:
  labels:
    {{- include "primeintellect-build-exporter.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* No checksum of the ConfigMaps or Secrets: the exporter re-reads each of their files
  when the kubelet updates them, so changing builds, config or a key never replaces the pod.
  What it cannot apply without a restart (the port, the flags) is in the pod spec itself. */}}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "primeintellect-build-exporter.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  containers:
    - name: exporter
      image: {{ include "primeintellect-build-exporter.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --config.file={{ include "primeintellect-build-exporter.configFilePath" . }}
        {{- if include "primeintellect-build-exporter.webConfig" . }}
        - --web.config.file={{ include "primeintellect-build-exporter.webDir" . }}/web-config.yml
        {{- end }}
        - --log.level={{ .Values.log.level }}
        - --log.format={{ .Values.log.format }}
        {{- if gt (int .Values.shards) 1 }}
        - --shard.count={{ int .Values.shards }}
        - --shard.index=$(POD_NAME)
        {{- end }}
        {{- if .Values.enableLifecycle }}
        - --web.enable-lifecycle
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- if or (gt (int .Values.shards) 1) .Values.extraEnv }}
      env:
        {{- if gt (int .Values.shards) 1 }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
      livenessProbe:
        {{- include "primeintellect-build-exporter.probe" (dict "root" . "probe" .Values.livenessProbe) | nindent 8 }}
      readinessProbe:
        {{- include "primeintellect-build-exporter.probe" (dict "root" . "probe" .Values.readinessProbe) | nindent 8 }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        # Directory mounts, never subPath: the kubelet updates them in place and the exporter
        # re-reads the config file, the builds file, the key, the web config and the
        # certificate when they change, without a restart.
        - name: config
          mountPath: {{ include "primeintellect-build-exporter.configDir" . }}/config
          readOnly: true
        - name: build-ids
          mountPath: {{ include "primeintellect-build-exporter.configDir" . }}/builds
          readOnly: true
        {{- if include "primeintellect-build-exporter.webConfig" . }}
        - name: web-config
          mountPath: {{ include "primeintellect-build-exporter.webDir" . }}
          readOnly: true
        {{- end }}
        {{- if include "primeintellect-build-exporter.tls" . }}
        - name: web-tls
          mountPath: {{ include "primeintellect-build-exporter.tlsDir" . }}
          readOnly: true
        {{- end }}
        - name: api-key
          mountPath: {{ include "primeintellect-build-exporter.configDir" . }}/secrets
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: state
          mountPath: {{ include "primeintellect-build-exporter.stateDir" . }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "primeintellect-build-exporter.fullname" . }}
    - name: build-ids
      configMap:
        name: {{ include "primeintellect-build-exporter.fullname" . }}-builds
    {{- if include "primeintellect-build-exporter.webConfig" . }}
    - name: web-config
      secret:
        secretName: {{ include "primeintellect-build-exporter.fullname" . }}-web
        defaultMode: 0440
    {{- end }}
    {{- if include "primeintellect-build-exporter.tls" . }}
    - name: web-tls
      secret:
        secretName: {{ .Values.webConfig.tls.secretName }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    - name: api-key
      secret:
        secretName: {{ include "primeintellect-build-exporter.secretName" . }}
        defaultMode: 0440
        items:
          - key: {{ include "primeintellect-build-exporter.secretKey" . }}
            path: api-key
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if not .Values.persistence.enabled }}
    - name: state
      emptyDir:
        sizeLimit: {{ .Values.persistence.emptyDirSizeLimit }}
    {{- else if le (int .Values.shards) 1 }}
    - name: state
      persistentVolumeClaim:
        claimName: {{ include "primeintellect-build-exporter.fullname" . }}-state
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The job selector of the exporter-health alerts in files/alerts.yaml, which the PrometheusRule
replaces with exporterJobSelector.
*/}}
{{- define "primeintellect-build-exporter.rulesFileJobSelector" -}}
job=~".*primeintellect-build.*"
{{- end }}

{{/*
The address of docs/runbooks.md that every runbook_url of the rules file starts with (before
its #anchor); prometheusRule.runbookBaseUrl replaces it.
*/}}
{{- define "primeintellect-build-exporter.rulesFileRunbookBaseUrl" -}}
https://github.com/primeintellect/primeintellect-build-exporter/blob/main/docs/runbooks.md
{{- end }}

{{/*
The label matchers by which the exporter-health alerts find the exporter's scrape job: the
value, else the job the ServiceMonitor's jobLabel (app.kubernetes.io/name on the Service)
gives every target, else the rules file's own.
*/}}
{{- define "primeintellect-build-exporter.exporterJobSelector" -}}
{{- if .Values.prometheusRule.exporterJobSelector }}
{{- .Values.prometheusRule.exporterJobSelector }}
{{- else if .Values.serviceMonitor.enabled }}
{{- printf "job=%q" (include "primeintellect-build-exporter.name" .) }}
{{- else }}
{{- include "primeintellect-build-exporter.rulesFileJobSelector" . }}
{{- end }}
{{- end }}
