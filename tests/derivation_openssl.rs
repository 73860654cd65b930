//! The known-answer vectors of `docs/derivation.md`, checked against custody's KDF and
//! against OpenSSL 3's KBKDF (`openssl kdf … KBKDF`), plus a seeded sweep against OpenSSL.
//!
//! The doc is the source of the vectors, so the page an operator reads is the page the
//! build checks. OpenSSL is an implementation custody shares no code with: agreement with
//! it is what lets an operator verify a key with public tools.
//!
//! Without an `openssl` 3.x binary the OpenSSL parts print a notice and pass, unless
//! `CUSTODY_REQUIRE_SERVICES=1` makes that a failure. `CUSTODY_OPENSSL` names the binary.

mod common;

use common::openssl::{
    hex, openssl_kbkdf, openssl_or_skip, parse_openssl_hex, spec_context, CONTEXT_LEN, SPEC_LABEL,
};
use std::path::Path;

use custody::kdf::{context_v1, DerivationKey, DerivationPath, RootSeed, HARDENED, LABEL_V1};
use uuid::Uuid;

const DOC_PATH: &str = "docs/derivation.md";
const VECTORS_BEGIN: &str = "<!-- kdf-vectors-v1:begin -->";
const VECTORS_END: &str = "<!-- kdf-vectors-v1:end -->";
const TABLE_HEADER: &str =
    "| # | seed (hex) | asset id | counter | path | context (hex) | key (hex) | covers |";
const VECTOR_FIELDS: [&str; 6] = ["seed", "asset", "counter", "path", "context", "key"];
const VECTORS_MIN: usize = 6;

const SWEEP_CASES: usize = 50;
/// ASCII "custody1": any fixed non-zero value keeps the sweep reproducible.
const SWEEP_XORSHIFT_SEED: u64 = 0x6375_7374_6f64_7931;

#[derive(Debug)]
struct Vector {
    line_no: usize,
    seed: [u8; 32],
    asset: Uuid,
    counter: u64,
    path: DerivationPath,
    path_text: String,
    context: [u8; CONTEXT_LEN],
    key: [u8; 32],
}

// ---------------------------------------------------------------------------------------
// (a) the doc's vectors against custody

#[test]
fn doc_vectors_match_custody_kdf() {
    assert_eq!(
        LABEL_V1.as_slice(),
        SPEC_LABEL,
        "LABEL_V1 drifted from the spec"
    );
    let vectors = doc_vectors();
    for v in &vectors {
        let context = context_v1(&v.asset, v.counter, &v.path);
        assert_eq!(
            hex(&context),
            hex(&v.context),
            "{DOC_PATH}:{}: context_v1 disagrees with the doc",
            v.line_no
        );
        assert_eq!(
            hex(&spec_context(
                v.asset.as_bytes(),
                v.counter,
                v.path.indices()
            )),
            hex(&v.context),
            "{DOC_PATH}:{}: the doc's context is not the spec's layout",
            v.line_no
        );
        let key = DerivationKey::new(&RootSeed::from_bytes(v.seed))
            .unwrap()
            .derive(&v.asset, v.counter, &v.path);
        assert_eq!(
            hex(key.as_slice()),
            hex(&v.key),
            "{DOC_PATH}:{}: custody derives another key",
            v.line_no
        );
    }
    assert_edges_covered(&vectors);
}

#[test]
fn doc_table_agrees_with_vectors_block() {
    let doc = read_doc();
    let vectors = parse_vectors(&doc);
    let rows = table_rows(&doc);
    assert_eq!(
        rows.len(),
        vectors.len(),
        "{DOC_PATH}: the table has {} rows, the vectors block {} lines",
        rows.len(),
        vectors.len()
    );
    for (i, (row, v)) in rows.iter().zip(&vectors).enumerate() {
        let expected = [
            (i + 1).to_string(),
            hex(&v.seed),
            v.asset.hyphenated().to_string(),
            v.counter.to_string(),
            v.path_text.clone(),
            hex(&v.context),
            hex(&v.key),
        ];
        assert_eq!(
            &row[..expected.len()],
            &expected[..],
            "{DOC_PATH}: table row {} disagrees with vectors line {}",
            i + 1,
            v.line_no
        );
    }
}

/// The edge cases the vectors exist for; deleting one of them must not go unnoticed.
fn assert_edges_covered(vectors: &[Vector]) {
    let brief_seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let brief_path = [0x8000_002c, 0x8000_0000, 0x8000_0000, 0x8000_0000, 7];
    let max_path = [0x8000_002c, u32::MAX, u32::MAX, u32::MAX, 0x7fff_ffff];
    let has = |what: &str, f: &dyn Fn(&Vector) -> bool| {
        assert!(vectors.iter().any(f), "{DOC_PATH}: no vector covers {what}");
    };
    has("the brief's path at counter 0 with seed 00..1f", &|v| {
        v.seed == brief_seed && v.counter == 0 && *v.path.indices() == brief_path
    });
    has("counter 2^63-1", &|v| v.counter == i64::MAX as u64);
    has("counter u64::MAX", &|v| v.counter == u64::MAX);
    has("every index at its maximum", &|v| {
        *v.path.indices() == max_path
    });
    has("an all-0xff seed", &|v| v.seed == [0xff; 32]);
    let same_but_asset = vectors.iter().any(|a| {
        vectors.iter().any(|b| {
            a.asset != b.asset && a.seed == b.seed && a.counter == b.counter && a.path == b.path
        })
    });
    assert!(
        same_but_asset,
        "{DOC_PATH}: no two vectors differ in the asset alone"
    );
    let collision = |counter: u64, last: u32| {
        move |v: &&Vector| {
            v.counter == counter
                && v.path.indices()[..4] == brief_path[..4]
                && v.path.indices()[4] == last
        }
    };
    let pair = vectors.iter().find(collision(3, 12)).and_then(|a| {
        vectors
            .iter()
            .filter(collision(23, 1))
            .find(|b| b.seed == a.seed && b.asset == a.asset)
            .map(|b| (a, b))
    });
    assert!(
        pair.is_some(),
        "{DOC_PATH}: no vectors for the article's collision (…/12 counter 3 vs …/1 counter 23)"
    );

    // Different inputs, different keys: a repeated key would mean a field is ignored.
    for (i, a) in vectors.iter().enumerate() {
        for b in &vectors[i + 1..] {
            assert_ne!(
                a.key, b.key,
                "{DOC_PATH}: lines {} and {} have the same key",
                a.line_no, b.line_no
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// (b) the doc's vectors against OpenSSL

#[test]
fn doc_vectors_match_openssl_kbkdf() {
    let vectors = doc_vectors();
    let Some(openssl) = openssl_or_skip("doc vectors against OpenSSL") else {
        return;
    };
    for v in &vectors {
        let key = openssl_kbkdf(&openssl, &v.seed, &v.context);
        assert_eq!(
            hex(&key),
            hex(&v.key),
            "{DOC_PATH}:{}: OpenSSL derives another key",
            v.line_no
        );
    }
}

// ---------------------------------------------------------------------------------------
// (c) a seeded sweep against OpenSSL

#[test]
fn seeded_sweep_matches_openssl_kbkdf() {
    let Some(openssl) = openssl_or_skip("seeded sweep against OpenSSL") else {
        return;
    };
    let mut rng = XorShift64(SWEEP_XORSHIFT_SEED);
    for case in 0..SWEEP_CASES {
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        let mut asset_bytes = [0u8; 16];
        for chunk in asset_bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        let asset = Uuid::from_bytes(asset_bytes);
        // Mix small counters, counters near the top and anything in between.
        let counter = match rng.next() % 4 {
            0 => rng.next() % 1000,
            1 => u64::MAX - rng.next() % 16,
            _ => rng.next(),
        };
        let free: [u32; 4] = std::array::from_fn(|_| match rng.next() % 3 {
            0 => (rng.next() % 100) as u32,
            _ => (rng.next() as u32) & !HARDENED,
        });
        let path_text = format!("m/44'/{}'/{}'/{}'/{}", free[0], free[1], free[2], free[3]);
        let path = DerivationPath::parse(&path_text)
            .unwrap_or_else(|e| panic!("case {case}: {path_text} refused: {e}"));
        let spec_indices = [
            44 | HARDENED,
            free[0] | HARDENED,
            free[1] | HARDENED,
            free[2] | HARDENED,
            free[3],
        ];
        assert_eq!(path.indices(), &spec_indices, "case {case}: {path_text}");

        let context = spec_context(&asset_bytes, counter, &spec_indices);
        assert_eq!(
            hex(&context_v1(&asset, counter, &path)),
            hex(&context),
            "case {case}: context_v1 is not the spec's layout"
        );
        let ours = DerivationKey::new(&RootSeed::from_bytes(seed))
            .unwrap()
            .derive(&asset, counter, &path);
        let theirs = openssl_kbkdf(&openssl, &seed, &context);
        assert_eq!(
            hex(ours.as_slice()),
            hex(&theirs),
            "case {case}: seed={} asset={asset} counter={counter} path={path_text}",
            hex(&seed)
        );
    }
}

/// Marsaglia's xorshift64 (13, 7, 17): reproducible, no dependency, plenty for test inputs.
struct XorShift64(u64);

impl XorShift64 {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ---------------------------------------------------------------------------------------
// docs/derivation.md

fn read_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC_PATH);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn doc_vectors() -> Vec<Vector> {
    parse_vectors(&read_doc())
}

/// The lines of the ```text block between the begin and end markers, one vector each.
fn parse_vectors(doc: &str) -> Vec<Vector> {
    let lines: Vec<&str> = doc.lines().collect();
    let marker = |m: &str| {
        let found: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].trim() == m).collect();
        assert_eq!(found.len(), 1, "{DOC_PATH}: expected exactly one {m:?}");
        found[0]
    };
    let (begin, end) = (marker(VECTORS_BEGIN), marker(VECTORS_END));
    assert!(
        begin < end,
        "{DOC_PATH}: {VECTORS_END:?} before {VECTORS_BEGIN:?}"
    );
    let block = &lines[begin + 1..end];
    assert!(
        block.len() >= 2 && block[0].trim() == "```text" && block[block.len() - 1].trim() == "```",
        "{DOC_PATH}: the markers must enclose one ```text block"
    );
    let vectors: Vec<Vector> = block[1..block.len() - 1]
        .iter()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_vector(begin + 3 + i, line))
        .collect();
    assert!(
        vectors.len() >= VECTORS_MIN,
        "{DOC_PATH}: {} vectors, want at least {VECTORS_MIN}",
        vectors.len()
    );
    vectors
}

fn parse_vector(line_no: usize, line: &str) -> Vector {
    let at = |what: String| -> ! { panic!("{DOC_PATH}:{line_no}: {what}\n  {line}") };
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() != VECTOR_FIELDS.len() {
        at(format!(
            "want {} fields separated by single spaces, found {}",
            VECTOR_FIELDS.len(),
            fields.len()
        ));
    }
    let mut values = [""; 6];
    for ((value, field), name) in values.iter_mut().zip(&fields).zip(VECTOR_FIELDS) {
        *value = field
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .unwrap_or_else(|| at(format!("want `{name}=…`, found `{field}`")));
    }
    let [seed, asset, counter, path_text, context, key] = values;

    let seed: [u8; 32] =
        unhex(seed).unwrap_or_else(|| at("seed: want 64 lowercase hex digits".into()));
    let asset_parsed = Uuid::parse_str(asset).unwrap_or_else(|e| at(format!("asset: {e}")));
    if asset_parsed.hyphenated().to_string() != asset {
        at("asset: want the lowercase hyphenated form".into());
    }
    let counter_parsed: u64 = counter
        .parse()
        .unwrap_or_else(|e| at(format!("counter: {e}")));
    if counter_parsed.to_string() != counter {
        at("counter: want plain decimal".into());
    }
    let path = DerivationPath::parse(path_text).unwrap_or_else(|e| at(format!("path: {e}")));
    if path.to_string() != path_text {
        at(format!("path: want the canonical form {path}"));
    }
    let context: [u8; CONTEXT_LEN] = unhex(context).unwrap_or_else(|| {
        at(format!(
            "context: want {} lowercase hex digits",
            2 * CONTEXT_LEN
        ))
    });
    let key: [u8; 32] =
        unhex(key).unwrap_or_else(|| at("key: want 64 lowercase hex digits".into()));
    Vector {
        line_no,
        seed,
        asset: asset_parsed,
        counter: counter_parsed,
        path,
        path_text: path_text.to_owned(),
        context,
        key,
    }
}

/// The cells of the human-readable table, backticks removed, one `Vec` per row.
fn table_rows(doc: &str) -> Vec<Vec<String>> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != TABLE_HEADER);
    assert!(
        lines.next().is_some(),
        "{DOC_PATH}: no table with header {TABLE_HEADER:?}"
    );
    let separator = lines.next().unwrap_or_default();
    assert!(
        separator.starts_with("|---"),
        "{DOC_PATH}: table header without separator"
    );
    lines
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            row.trim()
                .trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// hex

/// Strict: lowercase only, exactly `N` bytes.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[test]
fn openssl_output_parser_is_strict() {
    let good = "85:11:3F:2F:11:BE:76:83:F5:AF:C5:F6:97:36:6F:41:52:19:BF:2A:1D:06:45:B4:EB:11:5F:21:EC:17:4A:72";
    assert_eq!(
        parse_openssl_hex(good).map(|k| hex(&k)).as_deref(),
        Some("85113f2f11be7683f5afc5f697366f415219bf2a1d0645b4eb115f21ec174a72")
    );
    assert_eq!(parse_openssl_hex(&good[3..]), None, "31 bytes");
    assert_eq!(parse_openssl_hex(&format!("{good}:00")), None, "33 bytes");
    assert_eq!(
        parse_openssl_hex(&good.replace("85:", "8:")),
        None,
        "short group"
    );
    assert_eq!(parse_openssl_hex(""), None);
}
