//! The command line: the usage text and the parsed arguments, every flag of every command
//! in one [`Args`] (each command reads the ones it takes).

use std::path::PathBuf;

/// What `--help` prints (to stderr too, after a missing or unknown command).
pub(crate) const USAGE: &str = "usage:
  custody [CONNECTION] hello
  custody [CONNECTION] register ASSET_ID
  custody [CONNECTION] register --file FILE  operator: register the asset id on each line
                         (# comments and blank lines skipped), pipelined; reports each line
                         registered, exists, invalid (nothing changed), repeated or failed;
                         exit 1 unless every line was registered or existed
  custody [CONNECTION] status ASSET_ID
  custody [CONNECTION] assets [--state ACTIVE|ROTATING|SUSPENDED|RETIRED] [--page-size N]
                         auditor or operator: every registered asset as the store holds it,
                         in asset id order, with its state, counter, shard and the time of
                         its last change (LIST_ASSETS, page by page)
  custody [CONNECTION] derive ASSET_ID --path \"m/44'/0'/0'/0'/7\" --region US-EAST --purpose TRADING --ttl 300
  custody dev-certs DIR [--client-cn NAME] [--more-clients A,B]   write a development CA, server and client certificate
                                             (and DIR/clients/A.pem, A.key, … from the same CA)
  custody dev-seed FILE                      write a random development seed (NOT for production)
  custody [CONNECTION] rotate ASSET_ID [--rotation-id UUID] [--expect-counter N]
                         operator: move the asset's counter forward by one (a new key);
                         the rotation id (printed; a new one unless given) makes a retry
                         safe: the same id again answers the first result; with
                         --expect-counter it rotates only from that counter
  custody [CONNECTION] suspend ASSET_ID      operator: stop derivations of the asset
  custody [CONNECTION] resume ASSET_ID       operator: serve a suspended asset again
  custody [CONNECTION] retire ASSET_ID       admin: retire the asset for good (STATUS only)
  custody [CONNECTION] regions               the configured regions and which are enabled
  custody [CONNECTION] region disable|enable REGION
                         admin: switch a compliance region off (derivations in it are
                         refused REGION_DISABLED on every core once this answers) or on;
                         durable and audited
  custody [CONNECTION] policy reload         admin: the appliance re-reads its configuration
                         file and puts its [policy] (roles, rate limits, asset groups,
                         regions) in force, whole or not at all (as SIGHUP does); a bad
                         file is refused with every problem listed
  custody [CONNECTION] seal-status           the appliance's seal state (and unseal progress)
  custody [CONNECTION] seal                  admin: drop the unsealed seed at once
  custody [CONNECTION] unseal [--share-file FILE] [--reset]
                         admin: submit one unseal share (read from FILE, or typed at a
                         prompt that does not echo); on an HSM appliance, ask it to unseal
                         now; --reset discards the shares submitted so far
  custody init --config FILE (--share-dir DIR | --print-shares) [--shares N] [--threshold K]
               [--import-seed FILE] [--create-key]
                         the init ceremony: make a root seed (in the HSM for pkcs11) or
                         import one (32 raw bytes or 64 hex characters), split it into N
                         shares any K of which rebuild it (default 3 of 5; checked before
                         anything is written), write them one per file or print them once,
                         and write the sealed seed (pkcs11) or the share set (shamir);
                         --create-key first makes the wrapping key on the token
  custody [CONNECTION] prove SHARD SEQ HASH
                         auditor: prove a receipt (as DERIVE and ROTATE print it) is in
                         the audit log: its record has that hash and a checkpoint after
                         it verifies (exit 1 unless PROVEN)
  custody [CONNECTION] reconcile [--full]
                         auditor: the appliance reconciles its audit log now (the records
                         since its last run, or with --full every one) and reports the
                         figures and its first findings; exits 1 on any finding
  custody reconcile --offline --config FILE [--seed-file FILE | --share FILE...]
                         auditor, without the appliance: check the audit log straight in
                         the store the config names (SQLite file or PostgreSQL): every
                         shard's hash chain, the checkpoints (their MACs too, given the seed
                         as a file of 32 bytes or 64 hex digits, or k shares), counter
                         regressions, and every asset's stored counter against its newest
                         audited one; exits 1 on any finding (docs/audit.md)
  custody recover --share FILE [--share FILE]... [--config FILE | --fingerprint HEX]
                  [--asset ID --path PATH --counter N] [--write-seed FILE]
                         offline, without the appliance: rebuild the seed from K shares
                         (--share - reads share lines from stdin), check it against the
                         appliance's seed, derive the key of an asset at a path and
                         counter, or write the seed (mode 0600) for `init --import-seed`

CONNECTION:
  --addr HOST:PORT[,HOST:PORT...]
                         appliance address (default 127.0.0.1:7443, env CUSTODY_ADDR); several
                         (a highly available group): each command goes to the active, past
                         standbys' NOT_ACTIVE and closed connections, for up to 10 s; a
                         request cut off in flight is reported, not sent again (ROTATE: run
                         it again with the printed --rotation-id); seal, unseal and
                         seal-status take one address
  --certs DIR            use DIR/ca.pem, DIR/client.pem, DIR/client.key (env CUSTODY_CERTS)
  --ca FILE --cert FILE --key FILE
  --server-name NAME     name on the server certificate (default localhost)
  --json                 print the answer as JSON";

/// Every flag of the command line, and the command with its positional arguments.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) command: Option<String>,
    pub(crate) positional: Vec<String>,
    pub(crate) addr: Option<String>,
    pub(crate) certs: Option<PathBuf>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
    pub(crate) json: bool,
    pub(crate) path: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) purpose: Option<String>,
    pub(crate) ttl: Option<u32>,
    pub(crate) client_cn: Option<String>,
    pub(crate) more_clients: Vec<String>,
    pub(crate) config: Option<PathBuf>,
    pub(crate) import_seed: Option<PathBuf>,
    pub(crate) create_key: bool,
    pub(crate) share_dir: Option<PathBuf>,
    pub(crate) print_shares: bool,
    pub(crate) shares: Option<u8>,
    pub(crate) threshold: Option<u8>,
    pub(crate) share_inputs: Vec<String>,
    pub(crate) share_file: Option<PathBuf>,
    pub(crate) reset: bool,
    pub(crate) fingerprint: Option<String>,
    pub(crate) asset: Option<String>,
    pub(crate) counter: Option<u64>,
    pub(crate) write_seed: Option<PathBuf>,
    pub(crate) offline: bool,
    pub(crate) full: bool,
    pub(crate) seed_file: Option<PathBuf>,
    pub(crate) rotation_id: Option<String>,
    pub(crate) expect_counter: Option<u64>,
    pub(crate) file: Option<PathBuf>,
    pub(crate) state: Option<String>,
    pub(crate) page_size: Option<u16>,
}

/// The arguments of this process; `None` after printing the usage (`--help`).
pub(crate) fn parse_args() -> anyhow::Result<Option<Args>> {
    use lexopt::prelude::*;
    let mut a = Args::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => a.addr = Some(p.value()?.string()?),
            Long("certs") => a.certs = Some(p.value()?.into()),
            Long("ca") => a.ca = Some(p.value()?.into()),
            Long("cert") => a.cert = Some(p.value()?.into()),
            Long("key") => a.key = Some(p.value()?.into()),
            Long("server-name") => a.server_name = Some(p.value()?.string()?),
            Long("json") => a.json = true,
            Long("path") => a.path = Some(p.value()?.string()?),
            Long("region") => a.region = Some(p.value()?.string()?),
            Long("purpose") => a.purpose = Some(p.value()?.string()?),
            Long("ttl") => a.ttl = Some(p.value()?.parse()?),
            Long("client-cn") => a.client_cn = Some(p.value()?.string()?),
            Long("more-clients") => {
                a.more_clients = p.value()?.string()?.split(',').map(str::to_owned).collect()
            }
            Long("config") | Short('c') => a.config = Some(p.value()?.into()),
            Long("import-seed") => a.import_seed = Some(p.value()?.into()),
            Long("create-key") => a.create_key = true,
            Long("share-dir") => a.share_dir = Some(p.value()?.into()),
            Long("print-shares") => a.print_shares = true,
            Long("shares") => a.shares = Some(p.value()?.parse()?),
            Long("threshold") => a.threshold = Some(p.value()?.parse()?),
            Long("share") => a.share_inputs.push(p.value()?.string()?),
            Long("share-file") => a.share_file = Some(p.value()?.into()),
            Long("reset") => a.reset = true,
            Long("fingerprint") => a.fingerprint = Some(p.value()?.string()?),
            Long("asset") => a.asset = Some(p.value()?.string()?),
            Long("counter") => a.counter = Some(p.value()?.parse()?),
            Long("write-seed") => a.write_seed = Some(p.value()?.into()),
            Long("rotation-id") => a.rotation_id = Some(p.value()?.string()?),
            Long("expect-counter") => a.expect_counter = Some(p.value()?.parse()?),
            Long("offline") => a.offline = true,
            Long("full") => a.full = true,
            Long("seed-file") => a.seed_file = Some(p.value()?.into()),
            Long("file") => a.file = Some(p.value()?.into()),
            Long("state") => a.state = Some(p.value()?.string()?),
            Long("page-size") => a.page_size = Some(p.value()?.parse()?),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(None);
            }
            Value(v) if a.command.is_none() => a.command = Some(v.string()?),
            Value(v) => a.positional.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(a))
}
