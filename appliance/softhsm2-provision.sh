#!/usr/bin/env bash
# Provisions a SoftHSM2 token for custody's pkcs11 seal provider with the stock tools:
# a token, its user PIN, and the AES-256 wrapping key (sensitive, not extractable, for
# encryption and decryption only). Idempotent: an existing token or key is kept.
#
#   appliance/softhsm2-provision.sh [--label custody] [--key-label custody-seed-wrap] \
#       --pin-file /etc/custody/hsm.pin [--so-pin-file FILE]
#
# SOFTHSM2_CONF chooses the SoftHSM2 configuration (and so the token directory), as
# for every SoftHSM2 tool. The PIN files are read, never echoed; a missing PIN file is
# made with a random PIN (mode 0600). Production HSMs are provisioned with their vendor's
# tools to the same result: a token, a user PIN, and a key like this one.
set -euo pipefail

label=custody
key_label=custody-seed-wrap
pin_file=""
so_pin_file=""
module="${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
while [ $# -gt 0 ]; do
    case "$1" in
        --label) label=$2; shift 2 ;;
        --key-label) key_label=$2; shift 2 ;;
        --pin-file) pin_file=$2; shift 2 ;;
        --so-pin-file) so_pin_file=$2; shift 2 ;;
        --module) module=$2; shift 2 ;;
        *) echo "softhsm2-provision: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$pin_file" ] || { echo "softhsm2-provision: --pin-file FILE is required" >&2; exit 2; }
command -v softhsm2-util >/dev/null || { echo "softhsm2-provision: softhsm2-util not found (apt-get install softhsm2)" >&2; exit 1; }
command -v pkcs11-tool >/dev/null || { echo "softhsm2-provision: pkcs11-tool not found (apt-get install opensc)" >&2; exit 1; }

random_pin() { od -An -N8 -tu8 /dev/urandom | tr -d ' \n'; }
umask 077
if [ ! -s "$pin_file" ]; then random_pin > "$pin_file"; fi
if [ -z "$so_pin_file" ]; then so_pin_file="$pin_file.so"; fi
if [ ! -s "$so_pin_file" ]; then random_pin > "$so_pin_file"; fi
pin=$(tr -d '\r\n' < "$pin_file")
so_pin=$(tr -d '\r\n' < "$so_pin_file")

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*$"; then
    echo "token $label: present"
else
    softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
    echo "token $label: initialised"
fi

if pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin" \
        --list-objects --type secrkey 2>/dev/null | grep -q "label:[[:space:]]*$key_label\$"; then
    echo "key $key_label: present"
else
    pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin" \
        --keygen --key-type AES:32 --label "$key_label" --sensitive \
        --usage-decrypt >/dev/null
    echo "key $key_label: made (AES-256, sensitive, not extractable)"
fi
