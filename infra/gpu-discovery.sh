#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may use, as Spark's ResourceInformation
# JSON, e.g. {"name": "gpu", "addresses": ["0","1"]}. Install it at the path named in
# infra/spark-gpu.conf (spark.executor.resource.gpu.discoveryScript) and make it executable.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo '{"name": "gpu", "addresses": []}'
  exit 0
fi
addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' \
        | awk 'NF {printf "%s\"%s\"", (n++ ? "," : ""), $0}')
echo "{\"name\": \"gpu\", \"addresses\": [${addrs}]}"
