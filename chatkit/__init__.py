"""chatkit: fine-tune instruction-following chat models with DeepSpeed and talk to them.

The library holds the logic; the scripts under training/, inference/, data/, pretrained/ and tools/
are thin entry points over it.
"""

__version__ = "0.1.0"
