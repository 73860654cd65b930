#!/usr/bin/env bash
# Installs custody on a Debian-like host (systemd), from a checkout or from built binaries:
#
#   sudo appliance/install.sh                    build (cargo build --release) and install
#   sudo appliance/install.sh --bin-from DIR     install custodyd and custody from DIR
#   appliance/install.sh --root STAGE --bin-from DIR --no-system
#                                                lay the files out under STAGE only (a
#                                                package build, or a test): no user, no
#                                                systemctl, no ownership changes
#
# What it does (idempotent; nothing an operator changed is overwritten):
#   /usr/local/bin/custodyd, /usr/local/bin/custody          the binaries (0755)
#   user and group `custody` (system, no login, home /var/lib/custody); added to the
#     group `softhsm` when SoftHSM2 is installed, so the pkcs11 seal can open its tokens
#   /etc/custody            0750 root:custody: custody.toml (the reference config, only
#                           if none is there; otherwise custody.toml.new beside it)
#   /var/lib/custody        0700 custody:custody: the store, the sealed seed, the shares
#   /etc/systemd/system/custodyd.service                      the unit (0644)
#   /usr/share/custody/     alerts, dashboard, audit verifier, SQL, SoftHSM2 provisioning
#   /usr/share/doc/custody/ the runbook (operations.md) and the other docs
# then `systemctl daemon-reload`. It does not start or enable the unit: the HSM, the TLS
# files and the init ceremony come first (docs/operations.md, "Installing").
set -euo pipefail

root=""
bin_from=""
system=1
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2%/}; shift 2 ;;
        --bin-from) bin_from=$2; shift 2 ;;
        --no-system) system=0; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$system" = 1 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo), or use --root STAGE --no-system" >&2
    exit 1
fi

if [ -z "$bin_from" ]; then
    command -v cargo >/dev/null || {
        echo "install.sh: cargo not found; build elsewhere and pass --bin-from DIR" >&2
        exit 1
    }
    (cd "$here" && cargo build --release --bin custodyd --bin custody)
    bin_from="$here/target/release"
fi
for b in custodyd custody; do
    [ -x "$bin_from/$b" ] || { echo "install.sh: $bin_from/$b is missing or not executable" >&2; exit 1; }
done

# install(1) with an owner only when installing for real.
put() { # MODE OWNER:GROUP SRC DEST
    if [ "$system" = 1 ]; then
        install -m "$1" -o "${2%:*}" -g "${2#*:}" "$3" "$4"
    else
        install -m "$1" "$3" "$4"
    fi
}
dir() { # MODE OWNER:GROUP PATH
    if [ "$system" = 1 ]; then
        install -d -m "$1" -o "${2%:*}" -g "${2#*:}" "$3"
    else
        install -d -m "$1" "$3"
    fi
}

if [ "$system" = 1 ]; then
    if ! getent group custody >/dev/null; then
        groupadd --system custody
    fi
    if ! getent passwd custody >/dev/null; then
        useradd --system --gid custody --home-dir /var/lib/custody --no-create-home \
            --shell /usr/sbin/nologin --comment "custody key-custody appliance" custody
    fi
    if getent group softhsm >/dev/null; then
        usermod --append --groups softhsm custody
    fi
fi

dir 0755 root:root "$root/usr/local/bin"
put 0755 root:root "$bin_from/custodyd" "$root/usr/local/bin/custodyd"
put 0755 root:root "$bin_from/custody" "$root/usr/local/bin/custody"

dir 0750 root:custody "$root/etc/custody"
if [ -e "$root/etc/custody/custody.toml" ]; then
    put 0640 root:custody "$here/appliance/custody.toml" "$root/etc/custody/custody.toml.new"
    echo "kept /etc/custody/custody.toml; the reference config is beside it as custody.toml.new"
else
    put 0640 root:custody "$here/appliance/custody.toml" "$root/etc/custody/custody.toml"
fi
dir 0700 custody:custody "$root/var/lib/custody"

dir 0755 root:root "$root/etc/systemd/system"
put 0644 root:root "$here/systemd/custodyd.service" "$root/etc/systemd/system/custodyd.service"

dir 0755 root:root "$root/usr/share/custody"
dir 0755 root:root "$root/usr/share/custody/prometheus"
dir 0755 root:root "$root/usr/share/custody/grafana"
dir 0755 root:root "$root/usr/share/custody/sql"
put 0644 root:root "$here/appliance/prometheus/alerts.yml" "$root/usr/share/custody/prometheus/alerts.yml"
put 0644 root:root "$here/appliance/grafana/custody.json" "$root/usr/share/custody/grafana/custody.json"
for d in "$here"/appliance/sql/*/; do
    name=$(basename "$d")
    dir 0755 root:root "$root/usr/share/custody/sql/$name"
    for f in "$d"*; do
        put 0644 root:root "$f" "$root/usr/share/custody/sql/$name/$(basename "$f")"
    done
done
put 0755 root:root "$here/appliance/audit_verify.py" "$root/usr/share/custody/audit_verify.py"
put 0755 root:root "$here/appliance/softhsm2-provision.sh" "$root/usr/share/custody/softhsm2-provision.sh"
put 0644 root:root "$here/appliance/custody.toml" "$root/usr/share/custody/custody.toml.reference"
dir 0755 root:root "$root/usr/share/custody/systemd"
put 0644 root:root "$here/systemd/credentials.conf" "$root/usr/share/custody/systemd/credentials.conf"

dir 0755 root:root "$root/usr/share/doc/custody"
for f in "$here"/docs/*.md; do
    put 0644 root:root "$f" "$root/usr/share/doc/custody/$(basename "$f")"
done

if [ "$system" = 1 ] && [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<EOF
custody is installed${root:+ under $root}. Before \`systemctl enable --now custodyd\`:
  1. the HSM token and PIN (docs/operations.md, "The HSM and the root seed";
     /usr/share/custody/softhsm2-provision.sh for SoftHSM2), the PIN as a credential
     (the drop-in /usr/share/custody/systemd/credentials.conf, copied to
     /etc/systemd/system/custodyd.service.d/);
  2. the server certificate, key and client CA in /etc/custody (server.pem,
     server.key mode 0640 root:custody, ca.pem), named in /etc/custody/custody.toml;
  3. the init ceremony, as the user custody with the PIN credential (operations.md):
     systemd-run --pty --wait --collect -p User=custody \\
       -p LoadCredential=custody-pin:/etc/custody/hsm.pin \\
       /usr/local/bin/custody init --config /etc/custody/custody.toml --print-shares;
  4. custodyd check-config /etc/custody/custody.toml, then systemctl enable --now custodyd.
EOF
