#!/usr/bin/env bash
# A development CA and the certificates of a TLS deployment, made locally with openssl into a git-ignored folder:
#
#   deploy/tls/make-dev-certs.sh compose [OUT]          # names of docker-compose.yml (OUT: deploy/secrets/tls)
#   deploy/tls/make-dev-certs.sh k8s [OUT] [NAMESPACE]  # names of deploy/k8s (OUT: deploy/secrets/tls-k8s, genie)
#
# Files (PEM): ca.pem + ca.key (the CA; ca.key never leaves OUT), gateway.*, jobs.* (servers), model-service.*
# (the three Triton services: server, and client for their own liveness probe), gateway-client.* (the gateway's
# certificate towards the model services, mutual TLS). Every server certificate also names localhost and
# 127.0.0.1: the health checks and probes inside each container connect over loopback. Extra names for the
# gateway and job API (the host clients dial): GENIE_TLS_EXTRA_SANS="DNS:genie.example.com,IP:10.0.0.5".
# Development only: a production CA is your own (on Kubernetes cert-manager may issue the certificates with it:
# deploy/k8s/components/cert-manager).
set -euo pipefail

profile=${1:-compose}
case "$profile" in
  compose) out=${2:-deploy/secrets/tls}; gateway=gateway; jobs=jobs; models="tokenizer lam dynamics" ;;
  k8s)
    namespace=${3:-genie}; out=${2:-deploy/secrets/tls-k8s}; gateway=genie-gateway; jobs=genie-jobs
    models="genie-tokenizer genie-lam genie-dynamics genie-dynamics-replicas" ;;
  *) echo "usage: $0 compose|k8s [OUT] [NAMESPACE]" >&2; exit 2 ;;
esac
days=${GENIE_TLS_DAYS:-90}

# DNS names of one service: compose's service name; on Kubernetes also its namespaced and cluster names.
names() {
  local name
  for name in "$@"; do
    if [ "$profile" = k8s ]; then
      printf 'DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local,' \
        "$name" "$name" "$namespace" "$name" "$namespace" "$name" "$namespace"
    else
      printf 'DNS:%s,' "$name"
    fi
  done
}

# sign NAME USAGES SANS: NAME.key + NAME.pem signed by the CA (SANS empty: a client certificate).
sign() {
  local name=$1 usages=$2 sans=$3 extensions
  extensions=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usages"
    [ -z "$sans" ] || echo "subjectAltName=$sans"
  } > "$extensions"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
    -extfile "$extensions" -out "$out/$name.pem" 2>/dev/null
  rm -f "$out/$name.csr" "$extensions"
}

mkdir -p "$out"
chmod 700 "$out"   # the keys below are world-readable files: the folder is what keeps other users out
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=genie-dev-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
loopback="DNS:localhost,IP:127.0.0.1"
extra=${GENIE_TLS_EXTRA_SANS:+,$GENIE_TLS_EXTRA_SANS}
sign gateway serverAuth "$(names "$gateway")$loopback$extra"
sign jobs serverAuth "$(names "$jobs")$loopback$extra"
# shellcheck disable=SC2086  # one name per model service
sign model-service serverAuth,clientAuth "$(names $models)$loopback"
sign gateway-client clientAuth ""
# Compose bind-mounts secret files with their own mode, and the containers run as uid 10001: keys must be
# readable by it (Kubernetes Secret volumes are 0644 the same way). The CA key is not mounted anywhere.
chmod 644 "$out"/*.pem "$out"/gateway.key "$out"/jobs.key "$out"/model-service.key "$out"/gateway-client.key
chmod 600 "$out/ca.key"
rm -f "$out/ca.srl"
echo "wrote a development CA and the $profile certificates to $out (valid $days days)"
