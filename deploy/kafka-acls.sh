#!/usr/bin/env bash
# The trust boundary of tracewatch on Kafka (README, "Trust boundary"): SCRAM users and the ACLs
# that say what each may read and write. Run once by the compose `kafka-setup` service, inside
# the broker's network namespace, over the admin listener that only 127.0.0.1 can reach.
#
#   gateway    - the only writer of the input topic (the HTTP gateway; `tracewatch produce`)
#   worker     - reads the input, reads and writes the internal topics, writes the outputs;
#                explicitly DENIED writing the input (a compromised worker cannot forge events)
#   inspector  - reads alerts and verdicts
#   sink       - reads the alerts topic into the case store, in its own consumer group
#   operator   - super user: `tracewatch topics`, `catalog`, `rebuild`
set -euo pipefail
BIN=/opt/kafka/bin
ADMIN=(--bootstrap-server 127.0.0.1:9094)
P=${TRACEWATCH_TOPIC_PREFIX:-tracewatch}

for user in gateway worker inspector operator sink; do
  var="KAFKA_PASSWORD_${user^^}"
  "$BIN/kafka-configs.sh" "${ADMIN[@]}" --alter --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=${!var:?set $var}]"
done

acl() { "$BIN/kafka-acls.sh" "${ADMIN[@]}" --add --force "$@"; }

acl --allow-principal User:gateway --operation Write --operation Describe --topic "$P-events"
acl --allow-principal User:gateway --operation IdempotentWrite --cluster

acl --allow-principal User:worker --operation All --resource-pattern-type prefixed --topic "$P-"
acl --allow-principal User:worker --operation All --resource-pattern-type prefixed --group "$P-"
acl --allow-principal User:worker --operation IdempotentWrite --cluster
acl --deny-principal User:worker --operation Write --topic "$P-events"

for t in alerts verdicts; do
  acl --allow-principal User:inspector --operation Read --operation Describe --topic "$P-$t"
done
acl --allow-principal User:inspector --operation Read --resource-pattern-type prefixed \
  --group "tracewatch-cli-"
acl --allow-principal User:sink --operation Read --operation Describe --topic "$P-alerts"
acl --allow-principal User:sink --operation Read --group "$P-worker-cases-sink"
echo "tracewatch ACLs in place"
