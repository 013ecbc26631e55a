#!/bin/bash
# A container health check without curl: GET PATH from 127.0.0.1:PORT over
# plain HTTP and succeed when the status matches STATUS (an extended regular
# expression; any status by default). Without PATH, only a TCP connection
# is made (for servers that log every request they refuse).
#
#   healthcheck PORT [PATH [STATUS]]
set -eu
port=$1 path=${2:-} want=${3:-[0-9][0-9][0-9]}
exec 3<>"/dev/tcp/127.0.0.1/$port"
[[ -n $path ]] || exit 0
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$path" >&3
IFS= read -r -t 5 line <&3
[[ $line =~ ^HTTP/[0-9.]+\ ($want)\  ]]
