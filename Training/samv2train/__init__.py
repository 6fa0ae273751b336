"""samv2train: training SAM / Semantic-SAM / CrossSAM embedding models on the samv2core network."""
