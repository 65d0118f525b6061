package spec

import (
	"fmt"
	"strings"
)

// kvTransferFlags are the engine flags the plan sets from engine.kvTransfer.
var kvTransferFlags = []string{"--kv-transfer-config"}

// validateKVTransfer checks engine.kvTransfer on its own; CheckPair
// checks a prefill deployment against a decode one.
func validateKVTransfer(d *Deployment) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	e, k := &d.Engine, d.Engine.KVTransfer
	if e.Kind != EngineVLLM && e.Kind != EngineRayVLLM {
		bad("engine.kvTransfer", "is for vLLM (kind %s or %s); kind %s has no NixlConnector (SGLang's disaggregation is not built yet)", EngineVLLM, EngineRayVLLM, e.Kind)
	}
	if k.Connector != ConnectorNIXL {
		bad("engine.kvTransfer.connector", "unknown connector %q; nixl (vLLM's NixlConnector)", k.Connector)
	}
	if k.Role != RolePrefill && k.Role != RoleDecode {
		bad("engine.kvTransfer.role", "must be %s or %s, got %q", RolePrefill, RoleDecode, k.Role)
	}
	if k.FailurePolicy != "fail" && k.FailurePolicy != "recompute" {
		bad("engine.kvTransfer.failurePolicy", "must be fail or recompute, got %q", k.FailurePolicy)
	}
	if k.LeaseSeconds < 0 || k.LeaseSeconds > 86400 {
		bad("engine.kvTransfer.leaseSeconds", "must be 0 to 86400, got %d", k.LeaseSeconds)
	}
	band := 1
	if dp := e.DataParallel; dp != nil && dp.Size > 0 {
		band = dp.Size
	}
	lo, hi := k.SideChannelPort, k.SideChannelPort+band-1
	if lo < 1 || hi > 65535 {
		bad("engine.kvTransfer.sideChannelPort", "needs ports %d-%d (one per DP rank) within 1-65535", lo, hi)
	} else {
		apiHi := e.Port
		if dp := e.DataParallel; dp != nil {
			apiHi = e.Port + dp.APIPorts() - 1
		}
		if lo <= apiHi && e.Port <= hi {
			bad("engine.kvTransfer.sideChannelPort", "ports %d-%d (one per DP rank) clash with the API server's %d-%d", lo, hi, e.Port, apiHi)
		}
		if lo <= e.MasterPort && e.MasterPort <= hi {
			bad("engine.kvTransfer.sideChannelPort", "ports %d-%d include engine.masterPort (%d)", lo, hi, e.MasterPort)
		}
	}
	return append(errs, refuseOwned(e.Args, kvTransferFlags, "engine.kvTransfer")...)
}

// pairFlags must agree between the prefill and the decode engines of one
// model: the decode engine reads the KV the prefill engine wrote.
var pairFlags = []string{"--max-model-len", "--block-size", "--dtype", "--kv-cache-dtype", "--quantization", "--revision"}

// CheckPair refuses a prefill and a decode deployment of one served model
// whose engines could not exchange KV, naming the fields.
func CheckPair(prefill, decode *Deployment) error {
	var errs []string
	if prefill.Model.Source != decode.Model.Source {
		errs = append(errs, fmt.Sprintf("model.source: prefill %q and decode %q differ", prefill.Model.Source, decode.Model.Source))
	}
	for _, f := range pairFlags {
		p, _ := ArgValue(prefill.Engine.Args, f)
		d, _ := ArgValue(decode.Engine.Args, f)
		if p != d {
			errs = append(errs, fmt.Sprintf("engine.args %s: prefill %s and decode %s differ (the decode engine reads the prefill engine's KV as it was written)",
				f, orDefault(p), orDefault(d)))
		}
	}
	if pk, dk := prefill.Engine.KVTransfer, decode.Engine.KVTransfer; pk != nil && dk != nil && pk.Connector != dk.Connector {
		errs = append(errs, fmt.Sprintf("engine.kvTransfer.connector: prefill %s and decode %s differ", pk.Connector, dk.Connector))
	}
	if p, d := prefill.Engine.TensorParallelSize, decode.Engine.TensorParallelSize; d < p {
		errs = append(errs, fmt.Sprintf("engine.tensorParallelSize: decode %d is smaller than prefill %d (vLLM's NixlConnector needs decode TP ≥ prefill TP)", d, p))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: deployments %s (prefill) and %s (decode) of model %s cannot be paired: %s", ErrInvalid, prefill.Name, decode.Name,
		prefill.Engine.ServedModelName, strings.Join(errs, "; "))
}

func orDefault(v string) string {
	if v == "" {
		return "(default)"
	}
	return v
}
