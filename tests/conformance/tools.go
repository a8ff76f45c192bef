//go:build tools

package conformance

import _ "github.com/opencontainers/distribution-spec/conformance"
