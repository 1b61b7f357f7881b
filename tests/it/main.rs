//! The one integration test binary. Each area is a module; servers are started by the tests
//! on 127.0.0.1 and stopped when they end.

mod bench;
mod builders;
mod daemon;
mod dashboards;
mod decide;
mod demo;
mod e2e;
mod ha;
mod policy;
mod prometheus;
mod properties;
mod router_file;
mod router_haproxy;
mod router_nginx;
mod router_webhook;
mod sim;
mod support;
mod user_agent;
