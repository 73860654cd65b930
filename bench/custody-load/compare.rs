//! `article`: the article's design on PostgreSQL driven by the same schedule, and
//! `compare`: custody on PostgreSQL, then the article's design, with a table of the two.

use crate::article;
use crate::cli::Options;
use crate::demo::demo;
use crate::report::{finish, Headline, Report};
use crate::schedule::Session;
use anyhow::{bail, Context};

/// The article's design on PostgreSQL, driven by the same schedule.
pub fn article(o: &Options) -> anyhow::Result<(i32, Headline)> {
    let url = o
        .postgres
        .as_deref()
        .context("article needs --postgres URL")?;
    let database = crate::temp_database(url)?;
    if !o.json {
        eprintln!(
            "custody-load: the article's design in PostgreSQL database {}, {} connections",
            database.config.dbname, o.article_connections
        );
    }
    let o = Options {
        connections: o.article_connections,
        ..o.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("custody-load-pg")
        .enable_all()
        .build()?;
    let target = rt.block_on(article::start(&database.config, o.connections, o.assets))?;
    let session = Session::new(&o, 2);
    session.run(&o, &target, o.assets, None, None)?;
    let rows = rt.block_on(article::audit_rows(&database.config))?;
    drop(target);
    drop(rt);
    let (rec, memory, measured_unix_ms, cost) = session.take(None);
    let report = Report {
        article_audit_rows: Some(rows),
        cost,
        ..Report::new(0, rec, memory, measured_unix_ms)
    };
    let outcome = finish(&o, report, None)?;
    drop(database);
    Ok(outcome)
}

/// custody on PostgreSQL, then the article's design, with the same options.
pub fn compare(o: Options) -> anyhow::Result<i32> {
    if o.postgres.is_none() {
        bail!("compare needs --postgres URL");
    }
    let (custody_code, custody) = demo(o.clone())?;
    let (article_code, article) = article(&o)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    if o.json {
        let json = serde_json::json!({
            "custody": custody.json,
            "article": article.json,
            "throughput_ratio": ratio(custody.throughput, article.throughput),
            "p99_ratio_article_over_custody": ratio(article.p99, custody.p99),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        let _ = article_code;
        return Ok(custody_code);
    }
    println!(
        "\ncustody-load compare: {} req/s target, {} s, {} assets ({}), mix {}",
        o.rate,
        o.duration.as_secs_f64(),
        o.assets,
        o.distribution.describe(),
        o.mix.describe()
    );
    println!(
        "  {:<22} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "", "throughput", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    for (name, h) in [
        ("custody (PostgreSQL)", &custody),
        ("article's design", &article),
    ] {
        println!(
            "  {:<22} {:>12.0} {:>10.3} {:>10.3} {:>10.3} {:>10}",
            name, h.throughput, h.p50, h.p99, h.p999, h.errors
        );
    }
    println!(
        "  custody / article: {:.1}x the throughput; the article's p99 is {:.1}x custody's",
        ratio(custody.throughput, article.throughput),
        ratio(article.p99, custody.p99)
    );
    // custody must pass its own checks; the article is measured, not judged.
    let _ = article_code;
    Ok(custody_code)
}
