//! `serve`: builds the shared state and wires the Pingora server (proxy service plus the
//! background service that owns the Redis connection).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;
use fred::prelude::{Builder, Client, Config, ReconnectPolicy};
use pingora::server::configuration::Opt;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use secrecy::{ExposeSecret, SecretString};

use crate::audit::writer::AuditWriter;
use crate::audit::{AuditSink, Pipeline};
use crate::auth::Authenticator;
use crate::auth::cache::{DigestKey, PrincipalCache};
use crate::auth::change_feed::{ChangeFollower, ChangeLog};
use crate::auth::hasher::KeyHasher;
use crate::limits::leases::{LeaseBook, LeaseRenewer};
use crate::limits::local::LocalLimits;
use crate::limits::seed::Seeder;
use crate::limits::settlement::SettleQueue;
use crate::limits::{Limiter, LimiterConfig, LimiterRedis};
use crate::proxy::{AppState, Gateway};
use crate::readiness::Readiness;
use crate::redis_link::RedisLink;
use crate::settings::Settings;
use crate::store::{self, Store};
use crate::upstream::Upstreams;

/// How long the first use of a Redis connection waits for it.
const FIRST_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Longest shutdown waits for queued settlements once the last request is done.
const SETTLE_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn serve(settings: Settings, pingora_opt: Opt, no_migrate: bool) -> anyhow::Result<()> {
    let db_url = settings.require_database_url()?.clone();
    if !no_migrate {
        run_migrations(&db_url)?;
    }
    let store = Arc::new(Store::new(&db_url, settings.database_max_connections)?);
    // Two connections: the proxy's, started by its first request on its own runtime (see
    // `redis_link`), and a background one for the change feed and lease renewal, which must
    // work before any request arrives.
    let redis = settings
        .redis_url
        .as_ref()
        .map(|url| redis_client(url, &settings, None))
        .transpose()?;
    let redis_bg = settings
        .redis_url
        .as_ref()
        .map(|url| redis_client(url, &settings, Some(settings.redis_timeout)))
        .transpose()?;
    let redis_link = redis
        .clone()
        .map(|c| RedisLink::new(c, settings.redis_timeout.max(FIRST_CONNECT_WAIT)));
    let secret = match &settings.key_cache_secret {
        Some(s) => s.clone(),
        None => {
            tracing::warn!(
                "KEY_CACHE_SECRET is not set: using a per-process secret (fine for one instance; set it for several)"
            );
            random_secret()?
        }
    };
    let hasher = Arc::new(KeyHasher::new(&settings.argon2)?);
    let cache = Arc::new(PrincipalCache::new(
        settings.key_cache_ttl,
        settings.negative_cache_ttl,
        redis.clone(),
        settings.redis_timeout,
        &settings.redis_key_prefix,
    ));
    // Its own pool, created on the background service's runtime: one connection listens for
    // the feed's notifications, the other reads the feed.
    let changes = Arc::new(ChangeLog::default());
    let follower = ChangeFollower::new(
        Store::for_background(&db_url, 2)?,
        cache.clone(),
        redis_bg.clone(),
        changes.clone(),
        settings.key_cache_ttl,
    );
    let auth = Authenticator::new(
        DigestKey::new(&secret),
        cache,
        hasher,
        store.clone(),
        changes,
        settings.auth_failure_limit_per_min,
    );
    let upstreams = Upstreams::new(&settings)?;
    // Discovery also keeps the upstreams' addresses current for the proxy.
    let discovery_upstreams = upstreams.sharing_addresses();
    let readiness = Readiness::new(store.clone(), redis.clone());
    let discovery = Arc::new(crate::discovery::Discovery::default());
    let poller = crate::discovery::DiscoveryPoller {
        upstreams: discovery_upstreams,
        discovery: discovery.clone(),
        interval: settings.discovery_interval,
    };
    let listen = settings.listen_addr.to_string();
    let metrics_listen = settings.metrics_addr.to_string();
    let pipeline = Arc::new(Pipeline::new(settings.audit_spool_dir.clone()));
    let (audit, audit_rx) = AuditSink::channel(settings.audit_queue_capacity, pipeline.clone());
    // Requests holding an upstream slot; services behind the proxy outlive them at shutdown.
    let inflight = Arc::new(AtomicUsize::new(0));
    crate::metrics::register_inflight(inflight.clone());
    let audit_writer = AuditWriter::new(
        Store::for_background(&db_url, 2)?,
        audit_rx,
        pipeline.clone(),
        settings.audit_retention_days,
        settings.prompt_log_purge_interval,
        inflight.clone(),
    );
    let leases = Arc::new(LeaseBook::default());
    // Seeding is rare and may wait long: the background connection.
    let seeder = redis_bg.clone().map(|client| {
        Arc::new(Seeder::new(
            client,
            store.clone(),
            pipeline.clone(),
            settings.budgets.seed_grace,
        ))
    });
    // The script's calls run on connections of their own (`redis_script`).
    let limiter_redis = match (&redis, &settings.redis_url) {
        (Some(client), Some(url)) => Some(LimiterRedis::new(
            client.clone(),
            url.expose_secret(),
            settings.redis_timeout,
        )?),
        _ => None,
    };
    let config = LimiterConfig {
        fail_open: settings.limits_fail_open,
        mode: settings.budgets.mode,
        min_output: settings.budgets.min_output_tokens,
        default_output: settings.tpm_default_output_tokens,
        budget_default_output: settings.budgets.default_output_tokens,
        ns: settings.redis_key_prefix.clone(),
        retry_busy: true,
        redis_timeout: settings.redis_timeout,
        settle_after: crate::limits::settlement::FLUSH_AFTER,
    };
    let limiter = match limiter_redis {
        Some(redis) => Limiter::new(redis, leases.clone(), seeder, config),
        None => {
            tracing::warn!(
                "REDIS_URL is not set: rate limits and budgets are kept in this process; run one instance only"
            );
            let local = LocalLimits::new(store.clone(), pipeline.clone());
            Limiter::in_process(Arc::new(local), config)
        }
    };
    let clock_file = settings.clock_offset_file.clone();
    let state = Arc::new(AppState {
        audit,
        limiter,
        settings,
        auth,
        upstreams,
        readiness,
        discovery,
        inflight: inflight.clone(),
        redis: redis_link.clone(),
    });

    let settlements = state.limiter.settlements();
    let mut server =
        Server::new(Some(pingora_opt)).map_err(|e| anyhow::anyhow!("pingora conf: {e}"))?;
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(state),
        "neuronetz-gateway",
    );
    proxy.add_tcp(&listen);
    if let (Some(client), Some(link)) = (redis_bg, redis_link) {
        let background = RedisLink::new(client, FIRST_CONNECT_WAIT);
        server.add_service(background_service(
            "lease-renewal",
            LeaseRenewer {
                redis: background.client().clone(),
                book: leases,
                inflight: inflight.clone(),
            },
        ));
        server.add_service(background_service(
            "redis-connection",
            RedisConnection {
                background,
                link,
                inflight: inflight.clone(),
                settlements,
            },
        ));
    }
    server.add_service(background_service("change-feed", follower));
    server.add_service(background_service("model-discovery", poller));
    if let Some(path) = clock_file {
        crate::clock::load_offset(&path);
        server.add_service(background_service(
            "clock-offset",
            crate::clock::OffsetFile(path),
        ));
    }
    let mut metrics = pingora_prometheus::prometheus_http_service();
    metrics.add_tcp(&metrics_listen);
    server.add_service(metrics);
    server.add_service(background_service("audit-writer", audit_writer));
    server.add_service(background_service(
        "log-flusher",
        crate::log_sink::LogFlusher(&crate::log_sink::STDERR),
    ));
    server.add_service(proxy);
    tracing::info!(listen = %listen, "neuronetz-gateway serving");
    server.run(RunArgs::default());
    crate::log_sink::STDERR.set_buffered(false);
    Ok(())
}

fn run_migrations(url: &SecretString) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = store::connect_now(url).await?;
        store::migrate(&pool).await?;
        pool.close().await;
        Ok::<_, store::StoreError>(())
    })?;
    Ok(())
}

fn random_secret() -> anyhow::Result<SecretString> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| anyhow::anyhow!("system RNG unavailable"))?;
    Ok(SecretString::from(hex::encode(bytes)))
}

/// A Redis client whose commands fail at once while the server is away instead of queueing,
/// so the request path can fall back or fail closed quickly. `command_timeout`: fred's own
/// per-command timeout; the proxy's client has none and bounds its calls with
/// [`crate::redis_link::bounded`] instead.
fn redis_client(
    url: &SecretString,
    settings: &Settings,
    command_timeout: Option<std::time::Duration>,
) -> anyhow::Result<Client> {
    let mut config = Config::from_url(url.expose_secret()).map_err(|_| {
        anyhow::anyhow!("invalid setting REDIS_URL: not a redis:// or redis+unix:// URL")
    })?;
    config.fail_fast = true;
    let timeout = settings.redis_timeout;
    let client = Builder::from_config(config)
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout.unwrap_or(std::time::Duration::ZERO)
        })
        .with_connection_config(|c| {
            c.connection_timeout = timeout.max(std::time::Duration::from_millis(500));
            c.internal_command_timeout = timeout.max(std::time::Duration::from_millis(500));
            c.max_command_attempts = 1;
        })
        .set_policy(ReconnectPolicy::new_constant(0, 500))
        .build()?;
    Ok(client)
}

/// Keeps the background connection (on this service's runtime) and closes both connections
/// at shutdown. Started as a service so it survives Pingora's daemon fork.
struct RedisConnection {
    background: Arc<RedisLink>,
    link: Arc<RedisLink>,
    inflight: Arc<AtomicUsize>,
    settlements: Option<Arc<SettleQueue>>,
}

#[async_trait]
impl BackgroundService for RedisConnection {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.background.ensure_connected().await;
        let _ = shutdown.changed().await;
        // Requests still finishing settle their rate-limit charges through the proxy's link.
        crate::drain::until_idle(&self.inflight).await;
        if let Some(queue) = &self.settlements {
            queue
                .drain(tokio::time::Instant::now() + SETTLE_DRAIN_WAIT)
                .await;
        }
        self.link.quit().await;
        self.background.quit().await;
    }
}
