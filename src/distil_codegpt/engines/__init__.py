"""The inference engines behind one interface (prompt ids -> cached decode -> new ids), used by evaluate and serve.

base.py holds the interface and PyTorch's engines (fp32, int8), ctranslate2_engine.py and llamacpp_engine.py the
exported ones, speculative.py a student drafting for its teacher, and load.py which engine an artifact needs.
"""
