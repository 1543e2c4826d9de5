"""Load tests of the gateway: Locust scenarios, an invariant verifier and a runner."""
