"""What a retrieval method is: its head on the backbone, its loss, how its features become
codes and how its codes are searched. The losses of DPQ (and of the methods that share them)
are :mod:`.losses`."""
