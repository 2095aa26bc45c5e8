# -*- test-case-name: tests.e2e.test_twistd -*-
from twisted.application.service import ServiceMaker

bioproxy = ServiceMaker(
    "bioproxy", "bioproxy.tap", "KV-cache-warming reverse proxy for llama-server", "bioproxy"
)
