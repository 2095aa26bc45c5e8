# -*- test-case-name: tests.unit.test_architectures -*-
