#!/bin/sh
# Create the dynamic-security plugin's file with one admin client, unless it already exists.
#   SPARECYCLES_BROKER_ADMIN=USER:PASSWORD deploy/broker-init.sh FILE
# The password goes to mosquitto_ctrl on stdin (it asks twice), never on its command line, where
# any local user could read it in the process list. POSIX sh: the Mosquitto image has no bash.
set -eu

file="${1:?usage: SPARECYCLES_BROKER_ADMIN=USER:PASSWORD $0 FILE}"
admin="${SPARECYCLES_BROKER_ADMIN:?set SPARECYCLES_BROKER_ADMIN=USER:PASSWORD}"
user="${admin%%:*}"
password="${admin#*:}"
if [ "$user" = "$admin" ] || [ -z "$user" ] || [ -z "$password" ]; then
  echo "SPARECYCLES_BROKER_ADMIN must be USER:PASSWORD" >&2
  exit 2
fi

# The broker rewrites the file as clients and roles change: an existing one holds them all.
if [ -s "$file" ]; then
  echo "broker-init: $file exists; leaving it as it is"
  exit 0
fi

umask 077  # the file holds password hashes
printf '%s\n%s\n' "$password" "$password" | mosquitto_ctrl dynsec init "$file" "$user" >/dev/null
# The official image runs the broker as user mosquitto, which must be able to rewrite the file.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
  chown mosquitto:mosquitto "$file"
fi
echo "broker-init: created $file with admin client '$user'"
