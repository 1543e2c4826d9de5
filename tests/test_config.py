import pytest

from gateway.config import ConfigError, Settings, load_settings


def test_defaults_match_the_contract():
    s = load_settings(environ={})
    assert (s.redis_url, s.redis_mode, s.shards, s.idempotency_ttl) == (
        "redis://127.0.0.1:6379/0", "standalone", 16, 300)
    assert (s.key_mode, s.duplicate_response, s.auth) == ("token", "conflict", "header")
    assert s.admin_token is None and s.upstream_url is None
    assert s.database_url == "sqlite:///./orders.db"


def test_toml_then_environment(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('shards = 4\nkey_mode = "client"\nredis_url = "redis://file:1/0"\n')
    s = load_settings(path, environ={"SECKILL_SHARDS": "8"})
    assert (s.shards, s.key_mode, s.redis_url) == (8, "client", "redis://file:1/0")


@pytest.mark.parametrize("env", [
    {"SECKILL_SHARDS": "0"}, {"SECKILL_SHARDS": "x"}, {"SECKILL_REDIS_MODE": "sentinel"},
    {"SECKILL_KEY_MODE": "none"}, {"SECKILL_DUPLICATE_RESPONSE": "ignore"}, {"SECKILL_AUTH": "jwt"},
    {"SECKILL_KEY_PREFIX": "a{b}"}, {"SECKILL_IDEMPOTENCY_TTL": "1"},
])
def test_bad_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_settings(environ=env)


def test_unknown_toml_setting_is_refused(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("shardz = 4\n")
    with pytest.raises(ConfigError):
        load_settings(path, environ={})


def test_secrets_stay_out_of_repr():
    s = Settings(admin_token="top-secret", jwt_secret="jwt-secret", auth="jwt")
    assert "top-secret" not in repr(s) and "jwt-secret" not in repr(s)
