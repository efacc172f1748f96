#!/usr/bin/env bash
# Submit `imagelake run` to a cluster with spark-submit (client mode: the driver runs here and
# commits to the lake; executors run the partition functions).
#
#   MASTER=spark://master:7077 LAKE=s3://bucket/lakehouse infra/submit.sh --images s3://bucket/photos/ [run flags]
#
# imagelake builds its session with the same --master, so pass it to both (the script does).
# Environment: MASTER (required), LAKE (default ./lakehouse), PYTHON (the venv's python, the same
# path on every node), CONF (default infra/cluster/spark-defaults.conf), EXTRA_SUBMIT_ARGS.
# Exit codes are imagelake's: 0 ok, 1 a step failed, 2 bad input, 3 another run holds the lock.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${MASTER:?set MASTER, e.g. spark://master:7077}"
LAKE=${LAKE:-./lakehouse}
PYTHON=${PYTHON:-$HERE/../.venv/bin/python}
CONF=${CONF:-$HERE/cluster/spark-defaults.conf}
SPARK_HOME=${SPARK_HOME:-$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}
ENTRY=$("$PYTHON" -c 'import imagelake.__main__ as m; print(m.__file__)')
export PYSPARK_PYTHON=${PYSPARK_PYTHON:-$PYTHON} PYSPARK_DRIVER_PYTHON=${PYSPARK_DRIVER_PYTHON:-$PYTHON}
# shellcheck disable=SC2086
exec "$SPARK_HOME/bin/spark-submit" --master "$MASTER" --deploy-mode client --properties-file "$CONF" \
  ${EXTRA_SUBMIT_ARGS:-} "$ENTRY" --lake "$LAKE" --master "$MASTER" run --no-progress "$@"
