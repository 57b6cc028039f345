"""dllm.tools"""
