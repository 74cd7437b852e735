"""`anychip bench`: run the same workload on several backends and compare them."""
