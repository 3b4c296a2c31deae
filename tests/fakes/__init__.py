"""Local servers that speak external protocols (agent services, LLM APIs) for tests."""
