"""dllm.runtime"""
