#!/usr/bin/env bash
# Gives the local PostgreSQL a server certificate issued by a test CA, so the
# `sslmode = "verify-full"` tests run against the real server. Idempotent; needs root
# (or the postgres user) and a superuser connection. Prints the CA bundle's path.
#
#   CUSTODY_TEST_PG_CA=$(bash .ci/postgres-tls.sh) cargo test --release --test postgres_tls
set -euo pipefail

dir=/var/lib/postgresql/custody-test-tls
url=${CUSTODY_TEST_DATABASE_URL:-postgresql://root@127.0.0.1:5432/test}

if ! [ -s "$dir/server.pem" ] || ! openssl x509 -checkend 86400 -noout -in "$dir/server.pem" >/dev/null; then
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=custody test PostgreSQL CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 3650 -out "$dir/server.pem" \
        -extfile <(printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth") 2>/dev/null
    rm -f "$dir/server.csr"
fi
chown -R postgres:postgres "$dir"
chmod 600 "$dir/server.key" "$dir/ca.key"

psql "$url" -q -v ON_ERROR_STOP=1 \
    -c "ALTER SYSTEM SET ssl = on" \
    -c "ALTER SYSTEM SET ssl_cert_file = '$dir/server.pem'" \
    -c "ALTER SYSTEM SET ssl_key_file = '$dir/server.key'" \
    -c "SELECT pg_reload_conf()" >/dev/null

# The server must now present a certificate that verifies for 127.0.0.1.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    if openssl s_client -starttls postgres -connect 127.0.0.1:5432 -CAfile "$dir/ca.pem" \
        -verify_return_error -verify_ip 127.0.0.1 </dev/null >/dev/null 2>&1; then
        echo "$dir/ca.pem"
        exit 0
    fi
    sleep 0.5
done
echo "postgres-tls: the server does not present the test certificate (see its log)" >&2
exit 1
