"""dllm.exporter"""
