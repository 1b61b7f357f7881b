//! The one integration test binary. Each area is a module; servers are started by the tests
//! on 127.0.0.1 and stopped when they end.

mod bench;
mod support;
