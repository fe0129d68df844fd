//! The one binary's command line (SPEC §11). Every command reads the same settings as `serve`
//! (environment and/or `--config FILE`), prints a human table by default and `--json` for
//! scripts, and exits non-zero with one clear line on error.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::admin::{Admin, BudgetChange, ModelsChange, PolicyChange, RateLimitsChange, Subject};
use crate::auth::hasher::KeyHasher;
use crate::settings::{LogFormat, Settings};
use crate::store;
use crate::upstream::Upstreams;

#[derive(Parser)]
#[command(
    name = "neuronetz-gateway",
    version,
    about = "Secure multi-tenant gateway in front of Ollama"
)]
pub struct Cli {
    /// Gateway settings file (flat YAML map of the environment variable names); the
    /// environment overrides it.
    #[arg(long, global = true, env = "NZ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Who is making an admin change (recorded in admin_audit); default: the OS user.
    #[arg(long, global = true)]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        pingora: pingora::server::configuration::Opt,
        /// Do not apply pending database migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Create a tenant.
    CreateTenant {
        #[arg(long)]
        name: String,
        /// Allow every local model (never cloud models).
        #[arg(long)]
        allow_all_models: bool,
        /// Comma-separated list of allowed models.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[arg(long)]
        json: bool,
    },
    /// Suspend a tenant (all its keys fail) or resume it.
    SuspendTenant {
        #[arg(long)]
        name: String,
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        json: bool,
    },
    /// Create an API key; the key is printed once and never stored.
    CreateKey {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// e.g. 30d, 12h
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never secrets or hashes).
    ListKeys {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    RevokeKey {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        json: bool,
    },
    /// Issue a successor key; the old one keeps working for the grace period.
    RotateKey {
        #[arg(long)]
        prefix: String,
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        grace: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Set which models a tenant or key may use.
    SetModels {
        #[command(flatten)]
        subject: SubjectArgs,
        #[command(flatten)]
        change: ModelsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's or key's rate limits (requests/tokens per minute, concurrent requests).
    SetLimits {
        #[command(flatten)]
        subject: SubjectArgs,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        rpm: Option<i64>,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        tpm: Option<i64>,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        max_concurrent: Option<i64>,
        /// Unset all three (a key then inherits its tenant's; a tenant is unlimited).
        #[arg(long, conflicts_with_all = ["rpm", "tpm", "max_concurrent"])]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's or key's token budgets (UTC day, UTC month, all time).
    SetBudget {
        #[command(flatten)]
        subject: SubjectArgs,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        daily: Option<i64>,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        monthly: Option<i64>,
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        total: Option<i64>,
        /// Unset all three (a key then inherits its tenant's; a tenant is unlimited).
        #[arg(long, conflicts_with_all = ["daily", "monthly", "total"])]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// Store the prompts and answers of a tenant's or key's requests (opt-in), with an expiry.
    SetPromptLogging {
        #[command(flatten)]
        subject: SubjectArgs,
        #[command(flatten)]
        switch: PromptLoggingArgs,
        /// How long rows are kept (e.g. 7d, 12h); default 7d.
        #[arg(long, value_parser = parse_duration, requires = "on")]
        ttl: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Show token usage per tenant and key for the current UTC day, month and in total.
    ShowUsage {
        #[arg(long, conflicts_with = "prefix")]
        tenant: Option<String>,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, value_parser = ["day", "month", "total"])]
        period: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's or key's source-address policy.
    SetPolicy {
        #[command(flatten)]
        subject: SubjectArgs,
        /// Comma-separated CIDRs; `none` admits nobody, `any` lifts the restriction.
        #[arg(long)]
        allowed_cidrs: Option<String>,
        /// Largest `num_ctx` a request may use (`none` = no clamp).
        #[arg(long)]
        max_num_ctx: Option<String>,
        /// Largest output a request may ask for (`none` = no clamp).
        #[arg(long)]
        max_num_predict: Option<String>,
        /// `clamp` (default: [1m, 30m], 0 refused) or `pass` (forward as sent).
        #[arg(long, value_parser = ["clamp", "pass"])]
        keep_alive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Models the upstreams have (as discovery sees them) and which tenants may use each.
    ListModels {
        #[arg(long)]
        json: bool,
    },
    /// Check the upstream with the configured auth (GET /api/version and /api/tags).
    ProbeOllama {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SubjectArgs {
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    prefix: Option<String>,
}

impl SubjectArgs {
    fn subject(&self) -> Subject {
        match (&self.tenant, &self.prefix) {
            (Some(t), _) => Subject::Tenant(t.clone()),
            (None, Some(p)) => Subject::Key(p.clone()),
            // clap's group guarantees one of the two.
            (None, None) => Subject::Tenant(String::new()),
        }
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct PromptLoggingArgs {
    #[arg(long)]
    on: bool,
    #[arg(long)]
    off: bool,
    /// Back to inherit (key) / off (tenant).
    #[arg(long)]
    clear: bool,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct ModelsArgs {
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    #[arg(long)]
    allow_all: bool,
    #[arg(long)]
    no_allow_all: bool,
    /// Back to inherit (key) / no models (tenant).
    #[arg(long)]
    clear: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| format!("bad duration `{s}` (use e.g. 30d, 24h, 15m)"))
}

/// `serving`: the gateway's own log, which a daemon fork may send to Pingora's error log file
/// after this is set up, gets no colours; an admin command's gets them on a terminal.
pub fn init_tracing(format: LogFormat, serving: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = !serving && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(&crate::log_sink::STDERR);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    init_tracing(
        settings.log_format,
        matches!(cli.command, Command::Serve { .. }),
    );
    if let Some(path) = &settings.clock_offset_file {
        crate::clock::load_offset(path);
    }
    let actor = cli.actor.clone().unwrap_or_else(os_user);
    match cli.command {
        Command::Serve {
            pingora,
            no_migrate,
        } => crate::server::serve(settings, pingora, no_migrate),
        command => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_admin(settings, actor, command))
        }
    }
}

fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

async fn run_admin(settings: Settings, actor: String, command: Command) -> anyhow::Result<()> {
    if let Command::ProbeOllama { json } = command {
        return probe(&settings, json).await;
    }
    let pool = store::connect_now(settings.require_database_url()?).await?;
    if matches!(command, Command::Migrate) {
        store::migrate(&pool).await?;
        println!("migrations applied");
        return Ok(());
    }
    let admin = Admin { pool: &pool, actor };
    match command {
        Command::CreateTenant {
            name,
            allow_all_models,
            models,
            json,
        } => {
            let t = admin.create_tenant(&name, allow_all_models, models).await?;
            emit(json, &t, || {
                format!("created tenant {} (id {})", t.name, t.id)
            });
        }
        Command::SuspendTenant { name, resume, json } => {
            let t = admin.set_tenant_status(&name, !resume).await?;
            emit(json, &t, || {
                format!("tenant {} is now {}", t.name, t.status)
            });
        }
        Command::CreateKey {
            tenant,
            name,
            expires_in,
            json,
        } => {
            let hasher = KeyHasher::new(&settings.argon2)?;
            let k = admin
                .create_key(&hasher, &tenant, &name, expires_in)
                .await?;
            emit(json, &k, || created_key_text(&k));
        }
        Command::ListKeys { tenant, json } => {
            let keys = admin.list_keys(tenant.as_deref()).await?;
            emit(json, &keys, || keys_table(&keys));
        }
        Command::RevokeKey { prefix, json } => {
            admin.revoke_key(&prefix).await?;
            emit(
                json,
                &serde_json::json!({"prefix": prefix, "revoked": true}),
                || format!("revoked {prefix}"),
            );
        }
        Command::RotateKey {
            prefix,
            grace,
            json,
        } => {
            let hasher = KeyHasher::new(&settings.argon2)?;
            let k = admin.rotate_key(&hasher, &prefix, grace).await?;
            emit(json, &k, || {
                format!(
                    "{}\n{prefix} expires in {}",
                    created_key_text(&k),
                    humantime::format_duration(grace)
                )
            });
        }
        Command::SetModels {
            subject,
            change,
            json,
        } => {
            let change = if let Some(models) = change.models {
                ModelsChange::List(models)
            } else if change.allow_all {
                ModelsChange::AllowAll(true)
            } else if change.no_allow_all {
                ModelsChange::AllowAll(false)
            } else {
                ModelsChange::Clear
            };
            let subject = subject.subject();
            admin.set_models(&subject, change).await?;
            emit(
                json,
                &serde_json::json!({"updated": subject_label(&subject)}),
                || format!("updated models of {}", subject_label(&subject)),
            );
        }
        Command::SetLimits {
            subject,
            rpm,
            tpm,
            max_concurrent,
            clear,
            json,
        } => {
            if !clear && rpm.is_none() && tpm.is_none() && max_concurrent.is_none() {
                anyhow::bail!("set-limits needs --rpm, --tpm, --max-concurrent or --clear");
            }
            let subject = subject.subject();
            admin
                .set_limits(
                    &subject,
                    RateLimitsChange {
                        rpm,
                        tpm,
                        max_concurrent,
                        clear,
                    },
                )
                .await?;
            emit(
                json,
                &serde_json::json!({"updated": subject_label(&subject)}),
                || format!("updated limits of {}", subject_label(&subject)),
            );
        }
        Command::SetBudget {
            subject,
            daily,
            monthly,
            total,
            clear,
            json,
        } => {
            if !clear && daily.is_none() && monthly.is_none() && total.is_none() {
                anyhow::bail!("set-budget needs --daily, --monthly, --total or --clear");
            }
            let subject = subject.subject();
            admin
                .set_budget(
                    &subject,
                    BudgetChange {
                        daily,
                        monthly,
                        total,
                        clear,
                    },
                )
                .await?;
            emit(
                json,
                &serde_json::json!({"updated": subject_label(&subject)}),
                || format!("updated budgets of {}", subject_label(&subject)),
            );
        }
        Command::SetPromptLogging {
            subject,
            switch,
            ttl,
            json,
        } => {
            let enabled = if switch.on {
                Some(true)
            } else if switch.off {
                Some(false)
            } else {
                None
            };
            let ttl_s = ttl
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .map(|s| {
                    // Ten years: longer is a mistake, and beyond it dates overflow.
                    if (1..=10 * 366 * 86_400).contains(&s) {
                        Ok(s)
                    } else {
                        Err(anyhow::anyhow!("--ttl must be between 1s and 10 years"))
                    }
                })
                .transpose()?;
            let subject = subject.subject();
            admin.set_prompt_logging(&subject, enabled, ttl_s).await?;
            emit(
                json,
                &serde_json::json!({"updated": subject_label(&subject)}),
                || format!("updated prompt logging of {}", subject_label(&subject)),
            );
        }
        Command::ListModels { json } => {
            let upstreams = Upstreams::new(&settings)?;
            let rows = crate::model_report::list(&pool, &upstreams).await?;
            emit(json, &rows, || crate::model_report::table(&rows));
        }
        Command::ShowUsage {
            tenant,
            prefix,
            period,
            json,
        } => {
            let subject = match (tenant, prefix) {
                (Some(t), _) => Some(Subject::Tenant(t)),
                (None, Some(p)) => Some(Subject::Key(p)),
                (None, None) => None,
            };
            let periods = crate::clock::Periods::at(crate::clock::now());
            let period = period
                .as_deref()
                .and_then(crate::usage::PeriodFilter::parse);
            let rows = crate::usage::show(&pool, subject.as_ref(), period, periods).await?;
            emit(json, &rows, || crate::usage::table(&rows));
        }
        Command::SetPolicy {
            subject,
            allowed_cidrs,
            max_num_ctx,
            max_num_predict,
            keep_alive,
            json,
        } => {
            let change = PolicyChange {
                allowed_cidrs: allowed_cidrs.map(|c| match c.trim() {
                    "any" => None,
                    "none" | "" => Some(Vec::new()),
                    list => Some(list.split(',').map(|s| s.trim().to_string()).collect()),
                }),
                max_num_ctx: max_num_ctx
                    .map(|v| optional_count("--max-num-ctx", &v))
                    .transpose()?,
                max_num_predict: max_num_predict
                    .map(|v| optional_count("--max-num-predict", &v))
                    .transpose()?,
                keep_alive: keep_alive.map(|k| (k == "pass").then(|| "pass".to_string())),
            };
            if change.is_empty() {
                anyhow::bail!(
                    "set-policy needs --allowed-cidrs, --max-num-ctx, --max-num-predict or --keep-alive"
                );
            }
            let subject = subject.subject();
            admin.set_policy(&subject, change).await?;
            emit(
                json,
                &serde_json::json!({"updated": subject_label(&subject)}),
                || format!("updated policy of {}", subject_label(&subject)),
            );
        }
        Command::Serve { .. } | Command::Migrate | Command::ProbeOllama { .. } => {}
    }
    pool.close().await;
    Ok(())
}

/// `none` clears a cap; otherwise a positive whole number.
fn optional_count(flag: &str, v: &str) -> anyhow::Result<Option<i64>> {
    match v.trim() {
        "none" => Ok(None),
        n => match n.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => anyhow::bail!("{flag} takes a positive number or `none`"),
        },
    }
}

fn subject_label(s: &Subject) -> String {
    match s {
        Subject::Tenant(t) => format!("tenant {t}"),
        Subject::Key(p) => format!("key {p}"),
    }
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: {e}"),
        }
    } else {
        println!("{}", text());
    }
}

fn created_key_text(k: &crate::admin::CreatedKey) -> String {
    format!(
        "{}\n\nprefix {}  tenant {}  name {}{}\nStore this key now: it is shown once and cannot be recovered.",
        k.key,
        k.prefix,
        k.tenant,
        k.name,
        k.expires_at
            .map(|t| format!("  expires {}", t.to_rfc3339()))
            .unwrap_or_default()
    )
}

fn keys_table(keys: &[crate::admin::KeyInfo]) -> String {
    let mut rows = vec![
        ["PREFIX", "NAME", "TENANT", "CREATED", "EXPIRES", "STATUS"]
            .map(String::from)
            .to_vec(),
    ];
    for k in keys {
        rows.push(vec![
            k.prefix.clone(),
            k.name.clone(),
            k.tenant.clone(),
            k.created_at.format("%Y-%m-%d %H:%M").to_string(),
            k.expires_at
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
            k.status.clone(),
        ]);
    }
    table(&rows)
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Serialize)]
struct ProbeReport {
    upstream: String,
    token_attached: bool,
    ok: bool,
    version: Option<String>,
    models: Vec<String>,
    error: Option<String>,
}

async fn probe(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let upstreams = Upstreams::new(settings)?;
    let mut all_ok = true;
    let mut reports = Vec::new();
    for target in upstreams.targets() {
        let mut report = ProbeReport {
            upstream: format!("http://{}", target.host_header()),
            token_attached: upstreams.has_token(),
            ok: false,
            version: None,
            models: Vec::new(),
            error: None,
        };
        match probe_one(&upstreams, target).await {
            Ok((version, models)) => {
                report.ok = true;
                report.version = Some(version);
                report.models = models;
            }
            Err(e) => report.error = Some(e),
        }
        all_ok &= report.ok;
        reports.push(report);
    }
    if json {
        println!("{}", serde_json::to_string(&reports)?);
    } else {
        for r in &reports {
            match &r.error {
                None => println!(
                    "{}: ok, version {}, token attached: {}, models: {}",
                    r.upstream,
                    r.version.as_deref().unwrap_or("?"),
                    if r.token_attached { "yes" } else { "no" },
                    if r.models.is_empty() {
                        "(none)".to_string()
                    } else {
                        r.models.join(", ")
                    }
                ),
                Some(e) => println!(
                    "{}: FAILED ({e}), token attached: {}",
                    r.upstream,
                    if r.token_attached { "yes" } else { "no" }
                ),
            }
        }
    }
    if !all_ok {
        anyhow::bail!("probe failed");
    }
    Ok(())
}

async fn probe_one(
    upstreams: &Upstreams,
    target: &crate::settings::UpstreamTarget,
) -> Result<(String, Vec<String>), String> {
    let timeout = Duration::from_secs(10);
    let get = |path: &'static str| async move {
        let resp = upstreams
            .probe(target, path, timeout)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        if resp.status != 200 {
            return Err(format!("{path}: HTTP {}", resp.status));
        }
        serde_json::from_slice::<serde_json::Value>(&resp.body)
            .map_err(|_| format!("{path}: not JSON"))
    };
    let version = get("/api/version").await?;
    let tags = get("/api/tags").await?;
    let models = tags["models"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["name"].as_str().map(String::from))
                .take(5)
                .collect()
        })
        .unwrap_or_default();
    Ok((
        version["version"].as_str().unwrap_or("?").to_string(),
        models,
    ))
}
