"""dllm.engines"""
