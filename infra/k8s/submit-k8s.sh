#!/usr/bin/env bash
# `imagelake run` on Kubernetes with spark-submit, client mode: this pod (or machine) is the driver
# and commits to the lake; executors are pods from the image in infra/k8s/Dockerfile. Run it from
# the CronJob in infra/k8s/cronjob.yaml, or by hand:
#
#   K8S_API=https://kubernetes.default.svc IMAGE=registry.example.com/imagelake:0.1 \
#   LAKE=s3://bucket/lakehouse infra/k8s/submit-k8s.sh --images s3://bucket/photos/
#
# Not verified here (no Kubernetes cluster in the test environment).
set -euo pipefail
: "${K8S_API:?set K8S_API, e.g. https://kubernetes.default.svc}" "${IMAGE:?set IMAGE}" "${LAKE:?set LAKE}"
NAMESPACE=${NAMESPACE:-imagelake}
EXECUTORS=${EXECUTORS:-4}
MASTER="k8s://$K8S_API"
DRIVER_HOST=${DRIVER_HOST:-$(hostname -i)}   # executors connect back to this pod
exec "$SPARK_HOME/bin/spark-submit" --master "$MASTER" --deploy-mode client \
  --properties-file /opt/imagelake/infra/cluster/spark-defaults.conf \
  --conf spark.kubernetes.namespace="$NAMESPACE" \
  --conf spark.kubernetes.container.image="$IMAGE" \
  --conf spark.kubernetes.authenticate.serviceAccountName=imagelake \
  --conf spark.executor.instances="$EXECUTORS" \
  --conf spark.driver.host="$DRIVER_HOST" --conf spark.driver.port=7078 --conf spark.blockManager.port=7079 \
  --conf spark.kubernetes.executor.podNamePrefix=imagelake \
  --conf spark.executorEnv.AWS_REGION="${AWS_REGION:-us-east-1}" \
  --conf spark.kubernetes.executor.secretKeyRef.AWS_ACCESS_KEY_ID=imagelake-s3:access_key \
  --conf spark.kubernetes.executor.secretKeyRef.AWS_SECRET_ACCESS_KEY=imagelake-s3:secret_key \
  /opt/imagelake/imagelake/__main__.py --lake "$LAKE" --master "$MASTER" run --no-progress "$@"
