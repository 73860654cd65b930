//! `custody unseal`: a share for a `shamir` appliance, from a file or typed at a prompt
//! that does not echo, or an unseal-now for an HSM appliance and the wait for it.

use crate::args::Args;
use crate::output::seal_text;
use anyhow::Context;
use custody::client::{Client, ClientError};
use custody::hex::encode as hex;
use custody::seal::shamir;

/// `custody unseal`: one share to a `shamir` appliance (from a file, or typed at a prompt
/// that does not echo), or an unseal-now to an HSM appliance (then waits up to 10 s).
pub(crate) async fn unseal(
    client: &Client,
    args: &Args,
) -> anyhow::Result<Result<String, ClientError>> {
    let before = match client.seal_status().await {
        Ok(info) => info,
        Err(e) => return Ok(Err(e)),
    };
    let share = match (&args.share_file, before.provider) {
        (Some(path), _) => shamir::read_share_file(path)?.encode(),
        // A shamir appliance that is sealed: ask for a share (unless only resetting).
        (None, custody::wire::ProviderCode::Shamir) if !args.reset && !before.state.serving() => {
            eprintln!(
                "seed fingerprint {} (compare it with the ceremony record)",
                hex(&before.fingerprint)
            );
            eprintln!(
                "unseal progress {}/{}; share (not echoed):",
                before.shares_received, before.threshold
            );
            read_hidden_line().context("reading the share")?
        }
        _ => zeroize::Zeroizing::new(String::new()),
    };
    let answer = client.unseal(share.trim(), args.reset).await;
    drop(share);
    let mut info = match answer {
        Ok(info) => info,
        Err(e) => return Ok(Err(e)),
    };
    if info.provider != custody::wire::ProviderCode::Shamir && !info.state.serving() {
        // The HSM provider unseals on its own thread: wait for it.
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            info = match client.seal_status().await {
                Ok(info) => info,
                Err(e) => return Ok(Err(e)),
            };
            if info.state.serving() {
                break;
            }
        }
        if !info.state.serving() {
            // Exit non-zero: scripts must not take a still-sealed appliance for success.
            let mut message = format!(
                "still {} after 10 s of waiting for the provider",
                info.state.name()
            );
            if !info.reason.is_empty() {
                message.push_str(&format!(": {}", info.reason));
            }
            return Ok(Err(ClientError::Refused(custody::wire::Refusal::new(
                custody::wire::Status::Sealed,
                message,
            ))));
        }
    }
    Ok(Ok(seal_text(&info, args.json)))
}

/// Reads one line from stdin without echoing it when stdin is a terminal.
fn read_hidden_line() -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::io::BufRead;
    let fd = libc::STDIN_FILENO;
    // SAFETY: isatty and tcgetattr only read the terminal's state into `saved`.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let tty = unsafe { libc::isatty(fd) == 1 && libc::tcgetattr(fd, &mut saved) == 0 };
    if tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: sets the terminal's attributes from a copy of its own.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = std::io::stdin().lock().read_line(&mut line);
    if tty {
        // SAFETY: restores the attributes read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read?;
    Ok(line)
}
