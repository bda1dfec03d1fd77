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
Where things live inside the container.
*/}}
{{- define "primeintellect-build-exporter.configDir" -}}
/etc/primeintellect-build-exporter
{{- end }}

{{- define "primeintellect-build-exporter.apiKeyFile" -}}
{{ include "primeintellect-build-exporter.configDir" . }}/secrets/api-key
{{- end }}

{{/*
The exporter's config file: the `config` value, plus what the chart decides itself
(the key file it mounts and the port it exposes).
*/}}
{{- define "primeintellect-build-exporter.stateDir" -}}
/var/lib/primeintellect-build-exporter
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

{{- define "primeintellect-build-exporter.configFile" -}}
{{- $config := deepCopy .Values.config }}
{{- $api := get $config "api" | default dict }}
{{- $_ := set $api "api_key_file" (include "primeintellect-build-exporter.apiKeyFile" .) }}
{{- $_ = set $config "api" $api }}
{{- $_ = set $config "web" (dict "listen_address" (printf ":%d" (int .Values.containerPort))) }}
{{- $_ = set $config "state" (dict "path" (printf "%s/state.db" (include "primeintellect-build-exporter.stateDir" .))) }}
{{- toYaml $config }}
{{- end }}

{{/*
The pod template shared by the Deployment (one shard) and the StatefulSet (several).
*/}}
{{- define "primeintellect-build-exporter.podTemplate" -}}
metadata:
  labels:
    {{- include "primeintellect-build-exporter.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if not .Values.apiKey.existingSecret }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
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
        - --config.file={{ include "primeintellect-build-exporter.configDir" . }}/config.yaml
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
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "primeintellect-build-exporter.configDir" . }}/config.yaml
          subPath: config.yaml
          readOnly: true
        # A directory mount, not subPath: the kubelet updates it in place when the Secret
        # changes, and the exporter re-reads the key file without a restart.
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
