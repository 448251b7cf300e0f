//! `safedisk-proxy`: serve an artifact proxy, or run the drill.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use safedisk_core::WriteOptions;
use safedisk_proxy::cache_spec::{CacheSpec, S3Settings};
use safedisk_proxy::ecosystem::Ecosystem;
use safedisk_proxy::server::{self, ProxyConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about = "An artifact proxy whose cache never owns a request.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the proxy.
    Serve(ServeArgs),
    /// Prove the contract end to end: faults against SafeDisk and a naive tee.
    Drill(safedisk_proxy::drill::DrillArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A directory, or s3://BUCKET/PREFIX (credentials from the AWS_* variables).
    #[arg(long)]
    cache: CacheSpec,
    /// NAME=URL, NAME one of npm, pypi, crates, maven, go; repeat per ecosystem.
    #[arg(long = "upstream", value_parser = parse_upstream, required = true)]
    upstreams: Vec<(Ecosystem, url::Url)>,
    /// S3 endpoint for S3-compatible servers (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint.
    #[arg(long)]
    s3_allow_http: bool,
    /// Largest size of a directory cache: bytes, or a size such as 20GiB
    /// or 500MB; least-recently-used entries are evicted to stay under it
    /// (default: no limit).
    #[arg(long, value_parser = parse_max_size)]
    max_size: Option<u64>,
    /// Idle deadline of each cache write, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    idle_deadline_ms: u64,
}

fn parse_upstream(value: &str) -> Result<(Ecosystem, url::Url), String> {
    let (name, url) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not NAME=URL"))?;
    let ecosystem = name.parse::<Ecosystem>().map_err(|e| e.to_string())?;
    let mut url = url::Url::parse(url).map_err(|e| format!("bad url {url:?}: {e}"))?;
    if !url.path().ends_with('/') {
        // Joined paths must land under the base, not replace its last segment.
        url.set_path(&format!("{}/", url.path()));
    }
    Ok((ecosystem, url))
}

fn parse_max_size(value: &str) -> Result<u64, String> {
    let size = value
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("{value:?} is not a size: give bytes, or a number with a unit such as 20GiB or 500MB"))?
        .as_u64();
    if size == 0 {
        return Err(
            "a cache of 0 bytes would refuse every fill; leave --max-size out for no limit"
                .to_owned(),
        );
    }
    Ok(size)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The drill provokes thousands of cache failures on purpose; their log
    // lines would bury its progress. `RUST_LOG` still turns them on.
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        Command::Drill(_) => "off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Drill(args) => runtime.block_on(safedisk_proxy::drill::run(args)),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let idle = Duration::from_millis(args.idle_deadline_ms.max(1));
    let mut s3 = S3Settings::default();
    s3.endpoint = args.s3_endpoint;
    s3.region = args.s3_region;
    s3.allow_http = args.s3_allow_http;
    let backend = match args.cache.open(&s3, idle, args.max_size) {
        Ok(backend) => backend,
        Err(err) => {
            eprintln!("safedisk-proxy: cannot open the cache: {err}");
            return ExitCode::from(2);
        }
    };
    let mut config = ProxyConfig::new()
        .listen(args.listen)
        .fill(WriteOptions::new().idle_deadline(idle));
    for (ecosystem, url) in args.upstreams {
        config = config.upstream(ecosystem, url);
    }
    let proxy = match server::start(config, backend) {
        Ok(proxy) => proxy,
        Err(err) => {
            eprintln!("safedisk-proxy: cannot listen on {}: {err}", args.listen);
            return ExitCode::from(2);
        }
    };
    eprintln!("safedisk-proxy: serving on http://{}", proxy.addr());

    let _ = tokio::signal::ctrl_c().await;
    eprintln!("safedisk-proxy: shutting down");
    proxy.shutdown(Duration::from_secs(10)).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::parse_max_size;

    #[test]
    fn max_size_takes_bytes_and_units() {
        assert_eq!(parse_max_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_max_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_max_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_max_size("500MB"), Ok(500_000_000));
    }

    #[test]
    fn max_size_refuses_nonsense_and_zero() {
        for bad in ["", "-1", "ten", "10XB"] {
            let err = parse_max_size(bad).unwrap_err();
            assert!(err.contains("is not a size"), "{bad:?}: {err}");
        }
        let err = parse_max_size("0").unwrap_err();
        assert!(err.contains("0 bytes"), "{err}");
    }
}
